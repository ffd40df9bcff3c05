//! Bit-for-bit comparison of two paths' outputs.

use serde::Serialize;

/// The first element where two outputs differ.
#[derive(Serialize)]
pub struct Divergence {
    /// Token (row).
    pub token: usize,
    /// Column within the row.
    pub column: usize,
    /// Bits of the first path's value.
    pub a_bits: String,
    /// Bits of the second path's value.
    pub b_bits: String,
    /// The first path's value, printed.
    pub a: String,
    /// The second path's value, printed.
    pub b: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "token {}, column {}: {} ({}) vs {} ({})",
            self.token, self.column, self.a_bits, self.a, self.b_bits, self.b
        )
    }
}

/// One comparison between two paths on one tensor.
#[derive(Serialize)]
pub struct Comparison {
    /// `"a vs b"`.
    pub paths: String,
    /// Which tensor.
    pub tensor: &'static str,
    /// Elements compared.
    pub elements: usize,
    /// Elements whose bits differ (a length mismatch counts every missing element).
    pub differing: u64,
    /// The first differing element, if any.
    pub first: Option<Divergence>,
}

fn compare<T: Copy + PartialEq>(
    paths: &str,
    tensor: &'static str,
    a: &[T],
    b: &[T],
    row: usize,
    show: impl Fn(T) -> (String, String),
) -> Comparison {
    let row = row.max(1);
    let mut differing = a.len().abs_diff(b.len()) as u64;
    let mut first = None;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x != y {
            differing += 1;
            if first.is_none() {
                let ((a_bits, a_val), (b_bits, b_val)) = (show(x), show(y));
                first = Some(Divergence {
                    token: i / row,
                    column: i % row,
                    a_bits,
                    b_bits,
                    a: a_val,
                    b: b_val,
                });
            }
        }
    }
    Comparison {
        paths: paths.to_string(),
        tensor,
        elements: a.len().max(b.len()),
        differing,
        first,
    }
}

/// Compares f32 outputs by their bits (`row` elements per token).
pub fn compare_f32(
    paths: &str,
    tensor: &'static str,
    a: &[f32],
    b: &[f32],
    row: usize,
) -> Comparison {
    let ab: Vec<u32> = a.iter().map(|v| v.to_bits()).collect();
    let bb: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
    compare(paths, tensor, &ab, &bb, row, |bits| {
        (
            format!("0x{bits:08x}"),
            format!("{:e}", f32::from_bits(bits)),
        )
    })
}

/// Compares integer outputs (`row` elements per token).
pub fn compare_u32(
    paths: &str,
    tensor: &'static str,
    a: &[u32],
    b: &[u32],
    row: usize,
) -> Comparison {
    compare(paths, tensor, a, b, row, |v| {
        (format!("0x{v:08x}"), v.to_string())
    })
}
