//! Reference for the routing tables of `cuda/route.cu` ([`crate::kernels::route::RoutedRows`]):
//! what the device writes for a router's expert ids `ids: [n, k]` (routed row
//! `r = token * k + slot`), entry for entry. The tables are integers, so they are equal or not;
//! how the products group rows into tiles never changes a bit of their outputs.
//!
//! A table is packed `x_rows | experts | y_rows | gemm tiles | gemv tiles`, a tile being the
//! triple `(expert, first row, rows)`. Two tables per routing: `up` reads input row `r / k`
//! (the token), `down` reads row `r` (the routed row's intermediate); both write row `r`. An
//! id `>= n_experts` (which the router never writes) counts as the last expert.

/// `id` clamped to the experts.
fn clamp(id: u32, n_experts: usize) -> u32 {
    id.min(n_experts as u32 - 1)
}

/// The one-row-a-tile tables of `route_rows` (and the router's `route`): rows in (token,
/// slot) order, each its own GEMM and GEMV tile. `(up, down)`, `9 n k` entries each.
///
/// # Panics
/// If `k` or `n_experts` is 0.
pub fn unsorted(ids: &[u32], k: usize, n_experts: usize) -> (Vec<u32>, Vec<u32>) {
    assert!(k > 0 && n_experts > 0, "route::unsorted: k and n_experts");
    let len = ids.len();
    let mut up = vec![0u32; 9 * len];
    for (r, &id) in ids.iter().enumerate() {
        let (e, r32) = (clamp(id, n_experts), r as u32);
        up[r] = (r / k) as u32;
        up[len + r] = e;
        up[2 * len + r] = r32;
        up[3 * len + 3 * r..3 * len + 3 * r + 3].copy_from_slice(&[e, r32, 1]);
        up[6 * len + 3 * r..6 * len + 3 * r + 3].copy_from_slice(&[e, r32, 1]);
    }
    let mut down = up.clone();
    for (r, x) in down[..len].iter_mut().enumerate() {
        *x = r as u32;
    }
    (up, down)
}

/// The tiles of rows sorted by expert: each expert's run cut into tiles of at most `height`
/// rows, in order, as `(expert, first row, rows)` triples (what the products walk; the one
/// cutter of the host-built tables and of this reference).
pub fn tiles(sorted_experts: &[u32], height: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut r = 0;
    while r < sorted_experts.len() {
        let e = sorted_experts[r];
        let n = sorted_experts[r..].iter().take_while(|&&x| x == e).count();
        for first in (0..n).step_by(height) {
            out.extend([e, (r + first) as u32, height.min(n - first) as u32]);
        }
        r += n;
    }
    out
}

/// The expert-sorted tables of `route_count` + `route_sort`: every expert's rows together, in
/// expert order, (token, slot) order within one (a stable sort); each expert's rows cut into
/// GEMM tiles of at most 64 and GEMV tiles of at most 8, in expert order; then empty tiles
/// `(0, 0, 0)` up to the most any routing of `n k` rows can need (`n k / 64 + used` and
/// `n k / 8 + used` tiles, `used = min(n_experts, n k)`). `(up, down)`.
///
/// # Panics
/// If `k` or `n_experts` is 0.
pub fn sorted(ids: &[u32], k: usize, n_experts: usize) -> (Vec<u32>, Vec<u32>) {
    assert!(k > 0 && n_experts > 0, "route::sorted: k and n_experts");
    let len = ids.len();
    let used = n_experts.min(len);
    let (gt, vt) = (len / 64 + used, len / 8 + used);
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by_key(|&r| clamp(ids[r], n_experts));
    let mut rows = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for &r in &order {
        rows[0].push((r / k) as u32);
        rows[1].push(r as u32);
        rows[2].push(clamp(ids[r], n_experts));
        rows[3].push(r as u32);
    }
    let padded = |height: usize, count: usize| {
        let mut t = tiles(&rows[2], height);
        t.resize(3 * count, 0);
        t
    };
    let (g, v) = (padded(64, gt), padded(8, vt));
    let table = |x_rows: &[u32]| {
        let mut t = Vec::with_capacity(3 * len + g.len() + v.len());
        for part in [x_rows, &rows[2], &rows[3], &g, &v] {
            t.extend_from_slice(part);
        }
        t
    };
    (table(&rows[0]), table(&rows[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tokens, two slots, three experts: the tables written out by hand.
    #[test]
    fn small_tables_by_hand() {
        let ids = [2, 0, 2, 7]; // token 0 -> experts 2, 0; token 1 -> 2, 7 (clamped to 2)
        let (up, down) = unsorted(&ids, 2, 3);
        assert_eq!(&up[..12], &[0, 0, 1, 1, 2, 0, 2, 2, 0, 1, 2, 3]);
        assert_eq!(&down[..4], &[0, 1, 2, 3]);
        assert_eq!(&up[12..15], &[2, 0, 1]);
        let (up, down) = sorted(&ids, 2, 3);
        // Rows by expert: 1 (expert 0), then 0, 2, 3 (expert 2).
        assert_eq!(&up[..4], &[0, 0, 1, 1]);
        assert_eq!(&down[..4], &[1, 0, 2, 3]);
        assert_eq!(&up[4..8], &[0, 2, 2, 2]);
        assert_eq!(&up[8..12], &[1, 0, 2, 3]);
        // GEMM tiles (4 / 64 + 3 = 3): expert 0's one row, expert 2's three, one empty.
        assert_eq!(&up[12..21], &[0, 0, 1, 2, 1, 3, 0, 0, 0]);
        // GEMV tiles (4 / 8 + 3 = 3): the same cut.
        assert_eq!(&up[21..30], &[0, 0, 1, 2, 1, 3, 0, 0, 0]);
        assert_eq!(up.len(), 30);
    }

    /// An expert with more rows than a tile is cut into full tiles and a last short one.
    #[test]
    fn long_groups_are_cut() {
        let ids = vec![1u32; 70];
        let (up, _) = sorted(&ids, 1, 4);
        let (gt, vt) = (70 / 64 + 4, 70 / 8 + 4);
        let g = &up[3 * 70..3 * 70 + 3 * gt];
        assert_eq!(&g[..6], &[1, 0, 64, 1, 64, 6]);
        assert!(g[6..].iter().all(|&x| x == 0));
        let v = &up[3 * 70 + 3 * gt..];
        assert_eq!(v.len(), 3 * vt);
        assert_eq!(&v[3 * 8..3 * 9], &[1, 64, 6]);
    }
}
