//! `delta_net_scan`, `delta_net_gate` (kernels `cuda/delta_net.cu`, reference
//! [`crate::reference::delta_net`]): the recurrent steps of the Gated DeltaNet mixer on the
//! device, in either scan order, and the state a sequence carries between calls.

use cudarc::driver::DevicePtr;

use super::{as_u32, dims, function_with_dynamic_smem, geometry};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::delta_net::{
    ChunkDecodeArgs, ChunkFinishArgs, ChunkGramArgs, ChunkScanArgs, GateArgs, PrepArgs, ScanArgs,
    ScanV1Args,
};
use crate::launch::{In, Out};
use crate::spec::delta_net::{
    ChunkedState, DeltaNetConfig, DeltaNetState, DeltaNetWeights, ScanOrder, SCAN_CHUNK,
};
use crate::tensor::GpuTensor;

/// Head dims the scan kernel takes (a column of the state in the registers of 4 threads, one
/// 32-block each; 4 S threads a block).
pub const MAX_HEAD_DIM: usize = 128;

/// The per-mixer constants the scan reads: the convolution's taps `[conv_dim, Kc]`, `dt_bias`
/// and `ssm_a` (`[Hv]`).
pub struct GpuDeltaNetConsts {
    cfg: DeltaNetConfig,
    conv: GpuTensor<f32>,
    dt_bias: GpuTensor<f32>,
    ssm_a: GpuTensor<f32>,
}

impl GpuDeltaNetConsts {
    /// Uploads `w`'s constants (the projections go through the GEMM wrappers).
    pub fn upload(dev: &Device, w: &DeltaNetWeights) -> Result<Self> {
        let c = &w.cfg;
        c.validate()?;
        if c.head_dim > MAX_HEAD_DIM || 4 * c.head_dim < 9 {
            return Err(Error::invalid(
                "GpuDeltaNetConsts::upload",
                format!(
                    "head dim {} (the scan takes 3 to {MAX_HEAD_DIM})",
                    c.head_dim
                ),
            ));
        }
        Ok(GpuDeltaNetConsts {
            cfg: c.clone(),
            conv: GpuTensor::from_host(dev, &w.conv, &[c.conv_dim(), c.conv_kernel])?,
            dt_bias: GpuTensor::from_host(dev, &w.dt_bias, &[c.v_heads])?,
            ssm_a: GpuTensor::from_host(dev, &w.ssm_a, &[c.v_heads])?,
        })
    }
}

/// A sequence's recurrent state on the device: the convolution window, the scan's second
/// window (it reads one and writes the other: several blocks read a key head's channels; the
/// new window is then copied back, so that a captured decode step reads and writes the same
/// buffers on every replay), the `[Hv, S, S]` matrices and, in the chunked order, the chunk
/// under way.
pub struct GpuDeltaNetState {
    cfg: DeltaNetConfig,
    conv: GpuTensor<f32>,
    conv_next: GpuTensor<f32>,
    m: GpuTensor<f32>,
    chunk: Option<Box<ChunkBuffers>>,
}

/// Why a recurrence state cannot run or read as a chunked one.
const NOT_CHUNKED: &str = "the state is kept in the recurrence, not the chunked order";

/// The chunk under way of the chunked order ([`ChunkedState`]'s buffers, zeros past its
/// length): `k: [Hk, C, S]`, `u: [Hv, C, S]`, `f: [Hv, C]`, `e: [Hv]` and the length `len:
/// [1]`, kept on the device so that a captured decode step reads it; `ticket: [1]`, zero between
/// launches, counts the decode kernel's finished blocks.
struct ChunkBuffers {
    k: GpuTensor<f32>,
    u: GpuTensor<f32>,
    f: GpuTensor<f32>,
    e: GpuTensor<f32>,
    len: GpuTensor<u32>,
    ticket: GpuTensor<u32>,
}

impl GpuDeltaNetState {
    /// The state before the first token (zeros), for the recurrence
    /// ([`ScanOrder::Recurrence`]).
    pub fn new(dev: &Device, cfg: &DeltaNetConfig) -> Result<Self> {
        Self::with_order(dev, cfg, ScanOrder::Recurrence)
    }

    /// The state before the first token (zeros) for the scan order `order`: every call on it
    /// computes that order ([`delta_net_scan_with`]).
    pub fn with_order(dev: &Device, cfg: &DeltaNetConfig, order: ScanOrder) -> Result<Self> {
        cfg.validate()?;
        let (kc1, cd, s) = (cfg.conv_kernel - 1, cfg.conv_dim(), cfg.head_dim);
        let (hk, hv, c) = (cfg.k_heads, cfg.v_heads, SCAN_CHUNK);
        let rows = kc1.max(1);
        let chunk = match order {
            ScanOrder::Recurrence => None,
            ScanOrder::Chunked => Some(Box::new(ChunkBuffers {
                k: GpuTensor::zeros(dev, &[hk, c, s])?,
                u: GpuTensor::zeros(dev, &[hv, c, s])?,
                f: GpuTensor::zeros(dev, &[hv, c])?,
                e: GpuTensor::zeros(dev, &[hv])?,
                len: GpuTensor::zeros(dev, &[1])?,
                ticket: GpuTensor::zeros(dev, &[1])?,
            })),
        };
        Ok(GpuDeltaNetState {
            cfg: cfg.clone(),
            conv: GpuTensor::zeros(dev, &[rows, cd])?,
            conv_next: GpuTensor::zeros(dev, &[rows, cd])?,
            m: GpuTensor::zeros(dev, &[cfg.v_heads, s, s])?,
            chunk,
        })
    }

    /// The scan order this state is kept in.
    pub fn order(&self) -> ScanOrder {
        match self.chunk {
            None => ScanOrder::Recurrence,
            Some(_) => ScanOrder::Chunked,
        }
    }

    /// Back to the state before the first token (zeros), on the device's stream.
    pub fn clear(&mut self, dev: &Device) -> Result<()> {
        let st = dev.stream();
        st.memset_zeros(self.conv.slice_mut())?;
        st.memset_zeros(self.m.slice_mut())?;
        if let Some(c) = &mut self.chunk {
            st.memset_zeros(c.k.slice_mut())?;
            st.memset_zeros(c.u.slice_mut())?;
            st.memset_zeros(c.f.slice_mut())?;
            st.memset_zeros(c.e.slice_mut())?;
            st.memset_zeros(c.len.slice_mut())?;
            st.memset_zeros(c.ticket.slice_mut())?;
        }
        Ok(())
    }

    /// The window and the matrices on the host, as the CPU reference holds them (in the
    /// chunked order, the matrices at the last chunk boundary: [`ChunkedState::base`]).
    pub fn to_host(&self) -> Result<DeltaNetState> {
        let cfg = &self.cfg;
        let mut conv = self.conv.to_host()?;
        conv.truncate((cfg.conv_kernel - 1) * cfg.conv_dim());
        Ok(DeltaNetState {
            conv,
            m: self.m.to_host()?,
        })
    }

    /// The state on the host, flattened as the CPU sessions' `recurrent_state` give one
    /// layer's: the window and the matrices, then in the chunked order the chunk under way's
    /// keys, corrected values, factors and decays.
    pub fn to_host_flat(&self) -> Result<Vec<f32>> {
        Ok(match self.order() {
            ScanOrder::Recurrence => {
                let h = self.to_host()?;
                [h.conv, h.m].concat()
            }
            ScanOrder::Chunked => {
                let h = self.to_host_chunked()?;
                [h.base.conv, h.base.m, h.k, h.u, h.f, h.e].concat()
            }
        })
    }

    /// The whole chunked-order state on the host, as [`ChunkedState`] holds it; an error for
    /// a state kept in the recurrence.
    pub fn to_host_chunked(&self) -> Result<ChunkedState> {
        let c = self
            .chunk
            .as_ref()
            .ok_or_else(|| Error::invalid("GpuDeltaNetState::to_host_chunked", NOT_CHUNKED))?;
        Ok(ChunkedState {
            base: self.to_host()?,
            len: c.len.to_host()?[0] as usize,
            k: c.k.to_host()?,
            u: c.u.to_host()?,
            f: c.f.to_host()?,
            e: c.e.to_host()?,
        })
    }
}

/// Which scan runs. Both give the bits of [`crate::reference::delta_net::scan_cpu`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanKernel {
    /// v1 below [`SCAN_V2_MIN_TOKENS`] tokens (a decode step: one launch), v3 from there
    /// (2.1x v2 at 2048 tokens of the Qwen3.6 shape: BENCHMARKS.md).
    #[default]
    Auto,
    /// v1: one launch runs steps 2 to 5 token after token.
    V1,
    /// v2: `delta_net_prep_f32` runs steps 2 to 4 of every token at once, then
    /// `delta_net_scan2_f32` the delta rule alone in token order: 2.8x v1 at 2048 tokens.
    V2,
    /// v3: v2's prep, then `delta_net_scan3_f32`: the delta rule over `Hv x ceil(S / 32)`
    /// blocks, a column's partials combined by shuffles, one barrier per 16 tokens.
    V3,
    /// v5: v2's prep, then `delta_net_scan5_f32`: v3 where the head dim is 128 without its
    /// per-element bound checks and with 16-byte staging (v3's loop for other head dims). Not
    /// yet taken by [`ScanKernel::Auto`]: selectable until an H100 run measures it against v3.
    V5,
    /// v6: v5 with token `t`'s output dot and token `t + 1`'s decay and kv dot in one walk over
    /// the column (two independent fmaf chains a token, v4's schedule without the bound
    /// checks), `delta_net_scan6_f32`; v3's loop for other head dims. Selectable, not yet
    /// measured on a GPU.
    V6,
}

/// Tokens from which [`ScanKernel::Auto`] runs the prep and a column scan (v3; v2 before it). H200, the Qwen3.6 shape
/// (`benches/delta_net.rs`, 2026-12-01): v1 33.1 us for 1 token, 84.4 for 16, 1,796 for 512,
/// 8,118 for 2048; v2 56.8, 76.1, 749, 2,878 (its second launch costs one token's latency,
/// each token after is 1.4 us against 3.5-4.0).
pub const SCAN_V2_MIN_TOKENS: usize = 16;

/// Dynamic shared memory v2's prep kernel may take (a token's channels and its vectors'
/// norms); a mixer wider than this runs v1 under [`ScanKernel::Auto`].
const PREP_MAX_SMEM: usize = 200 * 1024;

/// Shared memory of `delta_net_prep_f32` for `cfg`: the token's conv_dim channels, then per q
/// and k vector (2 Hk of them) its scale and 4 norm partials.
fn prep_smem_bytes(cfg: &DeltaNetConfig) -> usize {
    (cfg.conv_dim() + 5 * 2 * cfg.k_heads) * 4
}

/// Steps 2 to 5 of the mixer over `n` tokens in order ([`crate::reference::delta_net::scan_cpu`]'s
/// bits): `mixed: [n, conv_dim]`, `b, a: [n, Hv]` (the projections) into `o: [n, Hv, S]`, the
/// state updated. A bad shape is an error and nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn delta_net_scan(
    dev: &Device,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
) -> Result<()> {
    delta_net_scan_with(dev, ScanKernel::Auto, consts, state, mixed, b, a, eps, o)
}

/// [`delta_net_scan`] with the kernel chosen by the caller. A state kept in the chunked order
/// ([`GpuDeltaNetState::with_order`]) runs the chunked order's kernels whatever `kernel` says
/// (its choices are the recurrence's): `delta_net_prep_f32`, then `delta_net_chunk_gram_f32`,
/// `delta_net_chunk_scan_f32` and `delta_net_chunk_finish_f32`, the bits of
/// [`crate::reference::delta_net::scan_chunked_cpu`]; a mixer too wide for the prep is then an
/// error.
#[allow(clippy::too_many_arguments)]
pub fn delta_net_scan_with(
    dev: &Device,
    kernel: ScanKernel,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "delta_net_scan";
    let c = &consts.cfg;
    let (s, hk, hv, kc, cd) = c.scan_dims();
    let [n, mcd] = dims(OP, "mixed", "[n, conv_dim]", mixed.dims())?;
    check_shape(OP, "mixed", &[n, cd], &[n, mcd])?;
    check_shape(OP, "b", &[n, hv], b.dims())?;
    check_shape(OP, "a", &[n, hv], a.dims())?;
    check_shape(OP, "o", &[n, hv, s], o.dims())?;
    if state.cfg != *c {
        return Err(Error::invalid(
            OP,
            "the state was made for another mixer shape",
        ));
    }
    let n32 = as_u32(OP, "tokens", n)?;
    let (hk32, hv32) = (as_u32(OP, "k_heads", hk)?, as_u32(OP, "v_heads", hv)?);
    let (s32, kc32) = (as_u32(OP, "head_dim", s)?, as_u32(OP, "conv_kernel", kc)?);
    as_u32(OP, "conv_dim", cd)?;
    if n == 0 {
        return Ok(());
    }
    let fits = prep_smem_bytes(c) <= PREP_MAX_SMEM;
    if state.chunk.is_some() {
        if !fits {
            return Err(Error::invalid(
                OP,
                format!(
                    "the chunked order's prep needs {} bytes of shared memory for conv_dim {cd} \
                     (at most {PREP_MAX_SMEM})",
                    prep_smem_bytes(c)
                ),
            ));
        }
        return scan_chunked(
            dev,
            consts,
            state,
            mixed,
            b,
            a,
            eps,
            o,
            [hk32, hv32, s32, kc32],
        );
    }
    let second = match kernel {
        ScanKernel::Auto if n >= SCAN_V2_MIN_TOKENS && fits => Some("delta_net_scan3_f32"),
        ScanKernel::Auto | ScanKernel::V1 => None,
        ScanKernel::V2 | ScanKernel::V3 | ScanKernel::V5 | ScanKernel::V6 if !fits => {
            return Err(Error::invalid(
                OP,
                format!(
                    "v2's prep needs {} bytes of shared memory for conv_dim {cd} (at most \
                     {PREP_MAX_SMEM}): run v1",
                    prep_smem_bytes(c)
                ),
            ))
        }
        ScanKernel::V2 => Some("delta_net_scan2_f32"),
        ScanKernel::V3 => Some("delta_net_scan3_f32"),
        ScanKernel::V5 => Some("delta_net_scan5_f32"),
        ScanKernel::V6 => Some("delta_net_scan6_f32"),
    };
    if let Some(scan) = second {
        return scan_v2(
            dev,
            scan,
            consts,
            state,
            mixed,
            b,
            a,
            eps,
            o,
            [n32, hk32, hv32, s32, kc32],
        );
    }
    let f = dev.function(Family::DeltaNet, "delta_net_scan_f32")?;
    let cfg = geometry((hv32, 1, 1), (4 * s32, 1, 1), 0);
    let args = ScanV1Args {
        o: Out::of(dev, o.slice_mut()),
        m: Out::of(dev, state.m.slice_mut()),
        conv_out: Out::of(dev, state.conv_next.slice_mut()),
        mixed: In::of(dev, mixed.slice()),
        bg: In::of(dev, b.slice()),
        ag: In::of(dev, a.slice()),
        conv_w: In::of(dev, consts.conv.slice()),
        conv_in: In::of(dev, state.conv.slice()),
        dt_bias: In::of(dev, consts.dt_bias.slice()),
        ssm_a: In::of(dev, consts.ssm_a.slice()),
        n: n32,
        hk: hk32,
        hv: hv32,
        s: s32,
        kc: kc32,
        eps,
    };
    // SAFETY: shapes checked above: mixed [n, conv_dim], b and a [n, Hv], o [n, Hv, S], the
    // state [Hv, S, S] and two [max(Kc - 1, 1), conv_dim] windows (distinct tensors: the scan
    // reads one and writes the other), the constants uploaded for this config; one block per
    // value head of 4 S <= 512 threads, each head's matrix written by its block alone, each
    // window channel by one block.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    dev.stream()
        .memcpy_dtod(state.conv_next.slice(), state.conv.slice_mut())?;
    Ok(())
}

/// v2, v3, v5 and v6 of [`delta_net_scan_with`]: the prep, then `scan`
/// (`delta_net_scan2_f32`, `..3_f32`, `..5_f32` or `..6_f32`, the same arguments). Shapes checked by the caller; `dims` = n, Hk, Hv,
/// S, Kc.
#[allow(clippy::too_many_arguments)]
fn scan_v2(
    dev: &Device,
    scan: &'static str,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
    dims: [u32; 5],
) -> Result<()> {
    let [n32, hk32, hv32, s32, kc32] = dims;
    let (prep, gates) = prep_launch(
        dev,
        consts,
        &state.conv,
        mixed.slice(),
        b.slice(),
        a.slice(),
        eps,
        n32 as usize,
    )?;
    let f = dev.function(Family::DeltaNet, scan)?;
    // v2: a block per value head, 4 threads a column; v3, v5, v6: 32 columns a block, 128
    // threads.
    let cfg = match scan {
        "delta_net_scan3_f32" | "delta_net_scan5_f32" | "delta_net_scan6_f32" => {
            geometry((hv32, s32.div_ceil(32), 1), (128, 1, 1), 0)
        }
        _ => geometry((hv32, 1, 1), (4 * s32, 1, 1), 0),
    };
    let args = ScanArgs {
        o: Out::of(dev, o.slice_mut()),
        m: Out::of(dev, state.m.slice_mut()),
        conv_out: Out::of(dev, state.conv_next.slice_mut()),
        prep: In::of(dev, prep.slice()),
        gates: In::of(dev, gates.slice()),
        mixed: In::of(dev, mixed.slice()),
        conv_in: In::of(dev, state.conv.slice()),
        n: n32,
        hk: hk32,
        hv: hv32,
        s: s32,
        kc: kc32,
    };
    // SAFETY: o [n, Hv, S], the state [Hv, S, S] and the two windows (distinct tensors), prep
    // and gates written by the launch above on the same stream; v2: one block per value head
    // of 4 S <= 512 threads (S >= 3, so 3 S + 2 copy threads), each head's matrix written by
    // its block alone; v3, v5, v6: one block per 32 columns of a head (S <= 128), each column
    // written by its block alone; each window channel by one block.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    dev.stream()
        .memcpy_dtod(state.conv_next.slice(), state.conv.slice_mut())?;
    Ok(())
}

/// `delta_net_prep_f32` over the `n` tokens of `mixed: [n, conv_dim]`, `b, a: [n, Hv]` (views
/// checked by the caller) after the window `conv`: returns `prep: [n, conv_dim]` (unit q, unit
/// k, v) and `gates: [n, Hv, 2]` (beta, decay).
#[allow(clippy::too_many_arguments)]
fn prep_launch(
    dev: &Device,
    consts: &GpuDeltaNetConsts,
    conv: &GpuTensor<f32>,
    mixed: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    a: &impl DevicePtr<f32>,
    eps: f32,
    n: usize,
) -> Result<(GpuTensor<f32>, GpuTensor<f32>)> {
    const OP: &str = "delta_net_scan";
    let c = &consts.cfg;
    let (s, hk, hv, kc, cd) = c.scan_dims();
    let mut prep = GpuTensor::<f32>::output(dev, &[n, cd])?;
    let mut gates = GpuTensor::<f32>::output(dev, &[n, hv, 2])?;
    let f = function_with_dynamic_smem(dev, Family::DeltaNet, "delta_net_prep_f32", PREP_MAX_SMEM)?;
    let smem = as_u32(OP, "prep shared memory", prep_smem_bytes(c))?;
    let cfg = geometry((as_u32(OP, "tokens", n)?, 1, 1), (256, 1, 1), smem);
    let args = PrepArgs {
        prep: Out::of(dev, prep.slice_mut()),
        gates: Out::of(dev, gates.slice_mut()),
        mixed: In::of(dev, mixed),
        bg: In::of(dev, b),
        ag: In::of(dev, a),
        conv_w: In::of(dev, consts.conv.slice()),
        conv_in: In::of(dev, conv.slice()),
        dt_bias: In::of(dev, consts.dt_bias.slice()),
        ssm_a: In::of(dev, consts.ssm_a.slice()),
        hk: as_u32(OP, "k_heads", hk)?,
        hv: as_u32(OP, "v_heads", hv)?,
        s: as_u32(OP, "head_dim", s)?,
        kc: as_u32(OP, "conv_kernel", kc)?,
        eps,
    };
    // SAFETY: mixed [n, conv_dim], b and a [n, Hv] (checked by the caller), prep [n,
    // conv_dim] and gates [n, Hv, 2] allocated here, the window [max(Kc - 1, 1), conv_dim] and
    // the constants of this config; a block per token, its shared memory the token's conv_dim
    // channels and 5 floats per q and k vector (at most PREP_MAX_SMEM, checked by the caller).
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok((prep, gates))
}

/// Tokens a call of the chunked order's kernels takes at most: a longer call runs as several
/// (the order's bits do not depend on how the tokens are cut), so that the tables of A and B
/// (`[Hv, segments, C, C]` each) stay within 34 MiB a table for 32 value heads.
const CHUNKED_MAX_CALL: usize = 4096;

/// Shared memory of `delta_net_chunk_gram_f32`: keys and queries `[C][129]`, the factors
/// `[C][65]`, the decays `[C]`.
const GRAM_SMEM: usize = (2 * SCAN_CHUNK * 129 + SCAN_CHUNK * 65 + SCAN_CHUNK) * 4;

/// Shared memory of `delta_net_chunk_scan_f32`: the rows `[128][32]`, keys and queries
/// transposed `[128][C]` and keys `[C][128]`, A and B `[C][C]`, u and v `[C][32]`, the dots'
/// tables `[2][32][72]`, e, beta and F `[C]`.
const CHUNK_SCAN_SMEM: usize = (128 * 32
    + 3 * 128 * SCAN_CHUNK
    + 2 * SCAN_CHUNK * SCAN_CHUNK
    + 2 * SCAN_CHUNK * 32
    + 2 * 32 * 72
    + 3 * SCAN_CHUNK)
    * 4;

/// Shared memory of `delta_net_chunk_decode_f32`: keys `[C][129]`, q and k `[129]`, the rows
/// `[32][129]`, A and B `[C]`, u `[C][32]`, the conv outputs `[2 * 128 + 32]`, 8 norm partials
/// and the flag.
const CHUNK_DECODE_SMEM: usize =
    (SCAN_CHUNK * 129 + 2 * 129 + 32 * 129 + 2 * SCAN_CHUNK + SCAN_CHUNK * 32 + 2 * 128 + 32 + 9)
        * 4;

/// The chunked order ([`crate::reference::delta_net::scan_chunked_cpu`]'s bits) over `n`
/// tokens, in calls of at most [`CHUNKED_MAX_CALL`]; a call of one token (a decode step) in one
/// launch, `delta_net_chunk_decode_f32`. Shapes checked by the caller; `dims` = Hk, Hv, S, Kc.
#[allow(clippy::too_many_arguments)]
fn scan_chunked(
    dev: &Device,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
    dims: [u32; 4],
) -> Result<()> {
    const OP: &str = "delta_net_scan";
    const C: usize = SCAN_CHUNK;
    let [hk32, hv32, s32, kc32] = dims;
    let (hv, s, cd) = (hv32 as usize, s32 as usize, consts.cfg.conv_dim());
    let n_all = mixed.dims()[0];
    if n_all == 1 {
        return chunk_decode(dev, consts, state, mixed, b, a, eps, o, dims);
    }
    // The tables, once for the longest call: a later call never allocates after the state
    // has moved. A call writes the slots of its live segments and reads no other.
    let nseg_max = n_all.min(CHUNKED_MAX_CALL).div_ceil(C) + 1;
    let mut ta = GpuTensor::<f32>::output(dev, &[hv, nseg_max, C, C])?;
    let mut tb = GpuTensor::<f32>::output(dev, &[hv, nseg_max, C, C])?;
    let mut te = GpuTensor::<f32>::output(dev, &[hv, nseg_max, C])?;
    let mut tf = GpuTensor::<f32>::output(dev, &[hv, nseg_max, C])?;
    let mut info = GpuTensor::<u32>::output(dev, &[1])?;
    for t0 in (0..n_all).step_by(CHUNKED_MAX_CALL) {
        let n = (n_all - t0).min(CHUNKED_MAX_CALL);
        let nseg = n.div_ceil(C) + 1;
        let (n32, nseg32) = (n as u32, nseg as u32);
        let mx = mixed.slice().slice(t0 * cd..(t0 + n) * cd);
        let bv = b.slice().slice(t0 * hv..(t0 + n) * hv);
        let av = a.slice().slice(t0 * hv..(t0 + n) * hv);
        let (prep, gates) = prep_launch(dev, consts, &state.conv, &mx, &bv, &av, eps, n)?;
        let ch = state
            .chunk
            .as_mut()
            .ok_or_else(|| Error::invalid(OP, NOT_CHUNKED))?;
        let gram = function_with_dynamic_smem(
            dev,
            Family::DeltaNet,
            "delta_net_chunk_gram_f32",
            GRAM_SMEM,
        )?;
        let args = ChunkGramArgs {
            ga: Out::of(dev, ta.slice_mut()),
            gb: Out::of(dev, tb.slice_mut()),
            ge: Out::of(dev, te.slice_mut()),
            gf: Out::of(dev, tf.slice_mut()),
            info: Out::of(dev, info.slice_mut()),
            prep: In::of(dev, prep.slice()),
            gates: In::of(dev, gates.slice()),
            ck: In::of(dev, ch.k.slice()),
            cf: In::of(dev, ch.f.slice()),
            ce: In::of(dev, ch.e.slice()),
            clen: In::of(dev, ch.len.slice()),
            n: n32,
            hk: hk32,
            hv: hv32,
            s: s32,
        };
        let cfg = geometry((hv32, nseg32, 1), (256, 1, 1), GRAM_SMEM as u32);
        // SAFETY: prep [n, conv_dim] and gates [n, Hv, 2] written above on this stream; the
        // chunk under way k [Hk, C, S], f [Hv, C], e [Hv], len [1] of this config (S <= 128);
        // the tables hold Hv x nseg_max >= Hv x nseg slots of [C, C] and [C] (nseg = ceil(n /
        // C) + 1 segments, the grid's y), each live block writing its own slot h * nseg + g (a
        // dead segment's slot is left as it was and read by no launch); info [1] written by
        // block (0, 0) alone.
        unsafe { dev.launch_kernel(&gram, cfg, &args) }?;
        let mut ov = o.slice_mut().slice_mut(t0 * hv * s..(t0 + n) * hv * s);
        let scan = function_with_dynamic_smem(
            dev,
            Family::DeltaNet,
            "delta_net_chunk_scan_f32",
            CHUNK_SCAN_SMEM,
        )?;
        let args = ChunkScanArgs {
            o: Out::of(dev, &mut ov),
            m: Out::of(dev, state.m.slice_mut()),
            cu: Out::of(dev, ch.u.slice_mut()),
            ga: In::of(dev, ta.slice()),
            gb: In::of(dev, tb.slice()),
            ge: In::of(dev, te.slice()),
            gf: In::of(dev, tf.slice()),
            prep: In::of(dev, prep.slice()),
            gates: In::of(dev, gates.slice()),
            ck: In::of(dev, ch.k.slice()),
            clen: In::of(dev, ch.len.slice()),
            n: n32,
            nseg: nseg32,
            hk: hk32,
            hv: hv32,
            s: s32,
        };
        let cfg = geometry(
            (hv32, s32.div_ceil(32), 1),
            (256, 1, 1),
            CHUNK_SCAN_SMEM as u32,
        );
        // SAFETY: o's rows t0 .. t0 + n of [n, Hv, S], the matrices [Hv, S, S] and u [Hv, C,
        // S] written by block (h, 32 rows) for its own rows alone; the tables written by the
        // launch above, every live segment's slot; prep, gates, the keys k [Hk, C, S] and len
        // read only; 256 threads (8 warps of 4 rows of 8 lanes), S <= 128.
        unsafe { dev.launch_kernel(&scan, cfg, &args) }?;
        let finish = dev.function(Family::DeltaNet, "delta_net_chunk_finish_f32")?;
        let args = ChunkFinishArgs {
            ck: Out::of(dev, ch.k.slice_mut()),
            cf: Out::of(dev, ch.f.slice_mut()),
            ce: Out::of(dev, ch.e.slice_mut()),
            clen: Out::of(dev, ch.len.slice_mut()),
            conv_out: Out::of(dev, state.conv_next.slice_mut()),
            info: In::of(dev, info.slice()),
            ge: In::of(dev, te.slice()),
            gf: In::of(dev, tf.slice()),
            prep: In::of(dev, prep.slice()),
            mixed: In::of(dev, &mx),
            conv_in: In::of(dev, state.conv.slice()),
            n: n32,
            nseg: nseg32,
            hk: hk32,
            hv: hv32,
            s: s32,
            kc: kc32,
        };
        let cfg = geometry((hv32, 1, 1), (256, 1, 1), 0);
        // SAFETY: block h writes f and e of head h, k of key head h (h < Hk) and head h's
        // window channels (q and k of key head h where h < Hk), block 0 the length; the
        // length this call started from is read from info (the gram's copy), not from len;
        // the tables of the last segment written by the gram; the two windows distinct.
        unsafe { dev.launch_kernel(&finish, cfg, &args) }?;
        dev.stream()
            .memcpy_dtod(state.conv_next.slice(), state.conv.slice_mut())?;
    }
    Ok(())
}

/// One token of the chunked order in one launch (`delta_net_chunk_decode_f32`, the bits of
/// the four launches for n = 1), then the window's copy. Shapes checked by the caller.
#[allow(clippy::too_many_arguments)]
fn chunk_decode(
    dev: &Device,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
    dims: [u32; 4],
) -> Result<()> {
    const OP: &str = "delta_net_scan";
    let [hk32, hv32, s32, kc32] = dims;
    let f = function_with_dynamic_smem(
        dev,
        Family::DeltaNet,
        "delta_net_chunk_decode_f32",
        CHUNK_DECODE_SMEM,
    )?;
    let ch = state
        .chunk
        .as_mut()
        .ok_or_else(|| Error::invalid(OP, NOT_CHUNKED))?;
    let args = ChunkDecodeArgs {
        o: Out::of(dev, o.slice_mut()),
        m: Out::of(dev, state.m.slice_mut()),
        cu: Out::of(dev, ch.u.slice_mut()),
        ck: Out::of(dev, ch.k.slice_mut()),
        cf: Out::of(dev, ch.f.slice_mut()),
        ce: Out::of(dev, ch.e.slice_mut()),
        clen: Out::of(dev, ch.len.slice_mut()),
        ticket: Out::of(dev, ch.ticket.slice_mut()),
        conv_out: Out::of(dev, state.conv_next.slice_mut()),
        mixed: In::of(dev, mixed.slice()),
        bg: In::of(dev, b.slice()),
        ag: In::of(dev, a.slice()),
        conv_w: In::of(dev, consts.conv.slice()),
        conv_in: In::of(dev, state.conv.slice()),
        dt_bias: In::of(dev, consts.dt_bias.slice()),
        ssm_a: In::of(dev, consts.ssm_a.slice()),
        hk: hk32,
        hv: hv32,
        s: s32,
        kc: kc32,
        eps,
    };
    let cfg = geometry(
        (hv32, s32.div_ceil(32), 1),
        (256, 1, 1),
        CHUNK_DECODE_SMEM as u32,
    );
    // SAFETY: mixed [1, conv_dim], b and a [1, Hv], o [1, Hv, S] (checked by the caller); the
    // matrices [Hv, S, S] and u [Hv, C, S] written by block (h, 32 rows) for its rows alone;
    // position t of k [Hk, C, S] by block (kh, 0), which no block reads; f, e, len and (after
    // a fold) k by the last block to take a ticket, once every block has read them; the two
    // windows distinct, each channel written by one block; S <= 128.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    dev.stream()
        .memcpy_dtod(state.conv_next.slice(), state.conv.slice_mut())?;
    Ok(())
}

/// Step 6's gate: `out = normed * silu(z)` elementwise (the three of one shape).
pub fn delta_net_gate(
    dev: &Device,
    normed: &GpuTensor<f32>,
    z: &GpuTensor<f32>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "delta_net_gate";
    check_shape(OP, "z", normed.dims(), z.dims())?;
    check_shape(OP, "out", normed.dims(), out.dims())?;
    let len = normed.len() as u64;
    if len == 0 {
        return Ok(());
    }
    let f = dev.function(Family::DeltaNet, "delta_net_gate_f32")?;
    let blocks = (normed.len().div_ceil(256)).clamp(1, 8192) as u32;
    let cfg = geometry((blocks, 1, 1), (256, 1, 1), 0);
    let args = GateArgs {
        out: Out::of(dev, out.slice_mut()),
        normed: In::of(dev, normed.slice()),
        z: In::of(dev, z.slice()),
        len,
    };
    // SAFETY: the three tensors hold len elements (one shape, checked above); the grid-stride
    // loop stays below len.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}
