//! Checks shared by the fuzz targets and by `cargo test`, which replays the committed corpus
//! through the same functions (tests/fuzz_corpus.rs). Inputs are decoded by [`input`]; the
//! properties live in [`check`]; [`reference`] is the RFC 9112 parser the codec is compared
//! with.

pub mod check;
pub mod input;
pub mod reference;
