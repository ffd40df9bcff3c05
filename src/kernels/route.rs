//! Routing tables for the expert-grouped products (kernels `cuda/route.cu`, reference
//! [`crate::reference::route`]): [`RoutedRows`], built on the host from a checked routing
//! ([`RoutedRows::new`]) or on the device from a router's ids, one row per tile
//! ([`RoutedRows::from_router`], a decode step) or sorted by expert
//! ([`RoutedRows::sorted_from_router`], a prefill), and read by
//! [`crate::kernels::gemm::matmul_grouped`].

use cudarc::driver::{CudaSlice, CudaView};

use super::gemm::{GEMM_TILE_ROWS, GEMV_MAX_ROWS};
use super::{as_u32, dims, geometry};
use crate::device::{Device, Family};
use crate::error::{check_indices, check_shape, Error, Result};
use crate::launch::args::route::{RouteCountArgs, RouteRowsArgs, RouteSortArgs};
use crate::launch::{In, Out};
use crate::reference::route::tiles;
use crate::tensor::GpuTensor;

/// A validated routing table, resident on the device: routed row `r` reads input row
/// `x_rows[r]`, multiplies by expert `experts[r]` and writes output row `y_rows[r]`.
///
/// The rows are stored sorted by expert (stably), and cut into tiles of one expert each: of at
/// most 64 rows for the GEMM and at most 8 for the GEMV. How rows are grouped into tiles never
/// changes a bit.
#[derive(Debug)]
pub struct RoutedRows {
    /// `x_rows | experts | y_rows | gemm tiles | gemv tiles`, one upload.
    pub(super) buf: CudaSlice<u32>,
    /// Start of each of the five parts in `buf`, and its end.
    pub(super) at: [usize; 6],
    pub(super) n_gemm_tiles: usize,
    pub(super) n_gemv_tiles: usize,
    pub(super) largest_group: usize,
    pub(super) len: usize,
    pub(super) nx: usize,
    pub(super) n_experts: usize,
    pub(super) ny: usize,
}

impl RoutedRows {
    /// Checks and uploads a routing table for inputs of `nx` rows, `n_experts` experts and
    /// outputs of `ny` rows. Every index must be in range and no output row may appear twice
    /// (two routed rows writing one output would race); otherwise a typed error, and nothing
    /// is uploaded.
    pub fn new(
        dev: &Device,
        x_rows: &[u32],
        experts: &[u32],
        y_rows: &[u32],
        nx: usize,
        n_experts: usize,
        ny: usize,
    ) -> Result<Self> {
        const OP: &str = "RoutedRows::new";
        let len = experts.len();
        check_shape(OP, "x_rows", &[len], &[x_rows.len()])?;
        check_shape(OP, "y_rows", &[len], &[y_rows.len()])?;
        check_indices(OP, "x_rows", x_rows, nx)?;
        check_indices(OP, "experts", experts, n_experts)?;
        check_indices(OP, "y_rows", y_rows, ny)?;
        as_u32(OP, "routed rows", len)?;
        let mut seen = vec![false; ny];
        for (position, &r) in y_rows.iter().enumerate() {
            if std::mem::replace(&mut seen[r as usize], true) {
                return Err(Error::invalid(
                    OP,
                    format!("y_rows[{position}] = {r} names an output row a second time"),
                ));
            }
        }
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by_key(|&i| experts[i]);
        let pick = |v: &[u32]| -> Vec<u32> { order.iter().map(|&i| v[i]).collect() };
        let (xs, es, ys) = (pick(x_rows), pick(experts), pick(y_rows));
        let gemm_tiles = tiles(&es, GEMM_TILE_ROWS);
        let gemv_tiles = tiles(&es, GEMV_MAX_ROWS);
        let largest_group = tiles(&es, usize::MAX)
            .chunks(3)
            .map(|t| t[2] as usize)
            .max()
            .unwrap_or(0);
        let mut at = [0usize; 6];
        let mut packed = Vec::with_capacity(3 * len + gemm_tiles.len() + gemv_tiles.len() + 1);
        for (i, part) in [&xs, &es, &ys, &gemm_tiles, &gemv_tiles]
            .into_iter()
            .enumerate()
        {
            at[i] = packed.len();
            packed.extend_from_slice(part);
        }
        at[5] = packed.len();
        // A zero-length table still needs a valid (non-null) buffer to pass.
        packed.push(0);
        dev.alloc_gate(4 * packed.len(), "RoutedRows")?;
        let buf = dev
            .stream()
            .clone_htod(&packed)
            .map_err(|e| Error::from_alloc(e, 4 * packed.len(), "RoutedRows"))?;
        Ok(RoutedRows {
            buf,
            at,
            n_gemm_tiles: gemm_tiles.len() / 3,
            n_gemv_tiles: gemv_tiles.len() / 3,
            largest_group,
            len,
            nx,
            n_experts,
            ny,
        })
    }

    /// The two routing tables of an MoE block built on the device from router ids
    /// `ids: [n, k]`, with no host round trip: `(up, down)`. The ids are never read back, so
    /// they cannot be checked: one `>= n_experts` (which `softmax_topk` never writes) is
    /// clamped to the last expert, which keeps every read inside the weights. Routed row `r = token * k + slot` (no sorting, one row per
    /// tile) reads token `r / k` through expert `ids[r]` in `up` and row `r` in `down`; both
    /// write row `r`, so `down`'s output is the `[n * k, dim]` partials in slot order. Grouping
    /// never changes a bit, so products over these tables equal those over [`RoutedRows::new`]'s.
    pub fn from_router(
        dev: &Device,
        ids: &GpuTensor<u32>,
        n_experts: usize,
    ) -> Result<(RoutedRows, RoutedRows)> {
        const OP: &str = "RoutedRows::from_router";
        let [n, k] = dims(OP, "ids", "[n, k]", ids.dims())?;
        // SAFETY: route_rows writes every entry of both tables below.
        let (mut up, mut down) = unsafe { RoutedRows::unsorted_uninit(dev, OP, n, k, n_experts) }?;
        let len = n * k;
        if len > 0 {
            let (len32, k32, ne32) = (len as u32, k as u32, n_experts as u32);
            let f = dev.function(Family::Route, "route_rows")?;
            let cfg = geometry((len32.div_ceil(128), 1, 1), (128, 1, 1), 0);
            let args = RouteRowsArgs {
                up: Out::of(dev, &mut up.buf),
                down: Out::of(dev, &mut down.buf),
                ids: In::of(dev, ids.slice()),
                len: len32,
                k: k32,
                n_experts: ne32,
            };
            // SAFETY: ids holds len = n * k entries; each table holds 9 * len + 1 u32; the
            // grid covers r < len.
            unsafe { dev.launch_kernel(&f, cfg, &args) }?;
        }
        Ok((up, down))
    }

    /// The two unsorted tables `(up, down)` of `n * k` routed rows (one row per tile, in
    /// (token, slot) order: [`RoutedRows::from_router`]'s layout), left unwritten for a
    /// kernel that writes every entry (`route_rows`, `router_route_f32`; `bx_route_row` in
    /// `cuda/common.cuh`). Checks `n_experts > 0` and that the tables' indices fit in u32.
    ///
    /// # Safety
    /// Nothing may read the tables (no product may use them) before every entry is written.
    pub(crate) unsafe fn unsorted_uninit(
        dev: &Device,
        op: &'static str,
        n: usize,
        k: usize,
        n_experts: usize,
    ) -> Result<(RoutedRows, RoutedRows)> {
        let len = n * k;
        if n_experts == 0 {
            return Err(Error::invalid(op, "no experts"));
        }
        as_u32(op, "routed rows", 9 * len + 1)?;
        as_u32(op, "k", k)?;
        as_u32(op, "n_experts", n_experts)?;
        let at = [0, len, 2 * len, 3 * len, 6 * len, 9 * len];
        let alloc = || {
            dev.alloc_gate(4 * (9 * len + 1), op)?;
            // SAFETY: the caller writes every entry before any read (above).
            unsafe { dev.stream().alloc::<u32>(9 * len + 1) }
                .map_err(|e| Error::from_alloc(e, 4 * (9 * len + 1), op))
        };
        let (up, down) = (alloc()?, alloc()?);
        let table = |buf, nx| RoutedRows {
            buf,
            at,
            n_gemm_tiles: len,
            n_gemv_tiles: len,
            largest_group: usize::from(len > 0),
            len,
            nx,
            n_experts,
            ny: len,
        };
        Ok((table(up, n), table(down, len)))
    }

    /// The packed table for a kernel that writes it ([`RoutedRows::unsorted_uninit`]).
    pub(crate) fn buf_mut(&mut self) -> &mut CudaSlice<u32> {
        &mut self.buf
    }

    /// The packed table on the host, `x_rows | experts | y_rows | gemm tiles | gemv tiles`
    /// (tiles as `(expert, first row, rows)` triples): what the products read, for inspection
    /// and tests.
    pub fn to_host(&self) -> Result<Vec<u32>> {
        if self.at[5] == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .buf
            .stream()
            .clone_dtoh(&self.buf.slice(..self.at[5]))?)
    }

    /// The two routing tables of an MoE block, sorted by expert on the device from router ids
    /// `ids: [n, k]`, with no host round trip: `(up, down)`. Each expert's rows lie together in
    /// (token, slot) order and are cut into tiles of one expert, as [`RoutedRows::new`] cuts
    /// them; routed row `r = token * k + slot` reads token `r / k` in `up` and row `r` in
    /// `down`, and both write row `r`, so every intermediate (and `down`'s `[n * k, dim]`
    /// output) is in slot order whatever the routing. The tile tables are sized for the most
    /// tiles any routing of `n * k` rows over `n_experts` experts can need; the ones past the
    /// last are empty and skipped by the products. As in [`RoutedRows::from_router`], an id
    /// `>= n_experts` (which `softmax_topk` never writes) counts as the last expert. Two
    /// launches, one block per expert each. Grouping never changes a bit: products over these
    /// tables equal those over [`RoutedRows::new`]'s.
    pub fn sorted_from_router(
        dev: &Device,
        ids: &GpuTensor<u32>,
        n_experts: usize,
    ) -> Result<(RoutedRows, RoutedRows)> {
        const OP: &str = "RoutedRows::sorted_from_router";
        let [n, k] = dims(OP, "ids", "[n, k]", ids.dims())?;
        let len = n * k;
        if n_experts == 0 {
            return Err(Error::invalid(OP, "no experts"));
        }
        // Most tiles of height h: sum over the used experts of ceil(c / h) <= len / h + used.
        let used = n_experts.min(len);
        let (gt, vt) = (len / GEMM_TILE_ROWS + used, len / GEMV_MAX_ROWS + used);
        let total = 3 * len + 3 * gt + 3 * vt;
        as_u32(OP, "routing table", total + 1 + n_experts)?;
        let (len32, k32, ne32, gt32, vt32) = (
            len as u32,
            as_u32(OP, "k", k)?,
            as_u32(OP, "n_experts", n_experts)?,
            gt as u32,
            vt as u32,
        );
        let at = [0, len, 2 * len, 3 * len, 3 * len + 3 * gt, total];
        let alloc = |extra: usize| {
            dev.alloc_gate(4 * (total + 1 + extra), OP)?;
            // SAFETY: route_sort writes every element of the table's `total` entries below
            // (rows, the used tiles and the padding tiles); `extra` holds route_count's counts,
            // all written before route_sort reads them.
            unsafe { dev.stream().alloc::<u32>(total + 1 + extra) }
                .map_err(|e| Error::from_alloc(e, 4 * (total + 1 + extra), OP))
        };
        let (mut up, mut down) = (alloc(n_experts)?, alloc(0)?);
        if len > 0 {
            let (mut tab, mut counts) = up.split_at_mut(total + 1);
            let count = dev.function(Family::Route, "route_count")?;
            let cfg = geometry((ne32, 1, 1), (256, 1, 1), 0);
            let args = RouteCountArgs {
                counts: Out::of(dev, &mut counts),
                ids: In::of(dev, ids.slice()),
                len: len32,
                n_experts: ne32,
            };
            // SAFETY: ids holds len entries, counts n_experts; one block per expert.
            unsafe { dev.launch_kernel(&count, cfg, &args) }?;
            let sort = dev.function(Family::Route, "route_sort")?;
            let args = RouteSortArgs {
                up: Out::of(dev, &mut tab),
                down: Out::of(dev, &mut down),
                counts: In::of(dev, &counts),
                ids: In::of(dev, ids.slice()),
                len: len32,
                k: k32,
                n_experts: ne32,
                gemm_tiles: gt32,
                gemv_tiles: vt32,
            };
            // SAFETY: both tables hold total + 1 entries laid out as `at` says (3 len rows,
            // gt and vt tiles of 3); counts (written by route_count above, same stream) sum to
            // len, so the rows and the used tiles fit; ids holds len entries.
            unsafe { dev.launch_kernel(&sort, cfg, &args) }?;
        }
        let table = |buf, nx| RoutedRows {
            buf,
            at,
            n_gemm_tiles: gt,
            n_gemv_tiles: vt,
            // A bound that holds for any ids (the router's k per token are distinct, but the
            // tables take any): the GEMV height it picks must cover every tile.
            largest_group: len,
            len,
            nx,
            n_experts,
            ny: len,
        };
        Ok((table(up, n), table(down, len)))
    }

    /// Part `i` of the packed table (0 x_rows, 1 experts, 2 y_rows, 3 GEMM tiles, 4 GEMV
    /// tiles) as a device view.
    pub(super) fn part(&self, i: usize) -> CudaView<'_, u32> {
        self.buf
            .slice(self.at[i]..self.at[i + 1].max(self.at[i] + 1))
    }

    /// Number of routed rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no row is routed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows routed to the most popular expert (1 for the one-row tiles of
    /// [`RoutedRows::from_router`]; for [`RoutedRows::sorted_from_router`]'s, which the host
    /// never sees, the bound `n * k`): what picks the kernel's tile height.
    pub fn largest_group(&self) -> usize {
        self.largest_group
    }
}
