//! Turns fuzz bytes into a payload and the pieces it arrives in, with no extra dependency:
//! byte 0 selects options, byte 1 says how many piece sizes follow, then the sizes, then the
//! payload.

/// A decoded fuzz input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// Options for the target.
    pub selector: u8,
    /// Sizes of the pieces the payload arrives in, cycled (never 0).
    pub pieces: Vec<usize>,
    /// The bytes under test.
    pub payload: &'a [u8],
}

/// Decodes `data`.
pub fn decode(data: &[u8]) -> Input<'_> {
    let selector = data.first().copied().unwrap_or(0);
    let count = data.get(1).map_or(0, |&n| usize::from(n % 16));
    let sizes = data.get(2..(2 + count).min(data.len())).unwrap_or(&[]);
    let pieces = sizes.iter().map(|&n| usize::from(n).max(1)).collect();
    let payload = data.get(2 + count..).unwrap_or(&[]);
    Input { selector, pieces, payload }
}

/// Cuts `payload` into pieces of the given sizes, cycled; one piece if there are no sizes.
pub fn cut(payload: &[u8], pieces: &[usize]) -> Vec<Vec<u8>> {
    if pieces.is_empty() {
        return vec![payload.to_vec()];
    }
    let mut out = Vec::new();
    let mut at = 0;
    for &size in pieces.iter().cycle() {
        if at >= payload.len() {
            break;
        }
        let end = (at + size).min(payload.len());
        out.push(payload[at..end].to_vec());
        at = end;
    }
    out
}

/// Builds a fuzz input from parts (for seeds and regression tests).
pub fn encode(selector: u8, pieces: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut data = vec![selector, pieces.len() as u8];
    data.extend_from_slice(pieces);
    data.extend_from_slice(payload);
    data
}
