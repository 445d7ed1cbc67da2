//! What serves requests: any async function from a request to a response.

use std::future::Future;

use http::{Request, Response};

use crate::body::Body;

/// Serves requests: implemented for every `Fn(Request<Body>) -> impl Future<Output =
/// Response<Body>>` that can be shared across threads, so a closure or an `async fn` is a
/// handler:
///
/// ```
/// use servicegroup::{Body, http::{Request, Response}};
///
/// async fn hello(_req: Request<Body>) -> Response<Body> {
///     Response::new(Body::from("hello"))
/// }
/// fn is_handler(_: impl servicegroup::Handler) {}
/// is_handler(hello);
/// is_handler(|_req: Request<Body>| async { Response::new(Body::from("hi")) });
/// ```
///
/// One handler value serves every connection; share state through captured `Arc`s. A panic
/// in a handler answers its client with 500 and closes that connection only.
pub trait Handler: Send + Sync + 'static {
    /// The future that produces the response.
    type Future: Future<Output = Response<Body>> + Send + 'static;

    /// Starts serving one request.
    fn call(&self, request: Request<Body>) -> Self::Future;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<Body>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    type Future = Fut;

    #[inline(always)]
    fn call(&self, request: Request<Body>) -> Fut {
        self(request)
    }
}
