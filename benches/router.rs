//! Bench of the router family (`cuda/router.cu`) at the 30B shape (128 experts, top 8, dim
//! 2048): `softmax_topk` over 1 to 2048 tokens' logits, and `route` (the decode batch's router
//! product, softmax, top-k and routing tables in one launch) over 1 to 8 tokens.
//!
//! Napkin math: softmax_topk reads the logits (4 bytes an expert) and writes k ids and
//! weights (8 bytes a slot); route reads the F32 router (1 MiB) once and x: bound by the
//! router's bytes. Both against a device copy of the same bytes in the same run.

mod common;

use bitexact::kernels::gemm::GpuMatrix;
use bitexact::kernels::router::{route, softmax_topk, RouteCounters};
use bitexact::quant::{QuantMatrix, WeightFormat};
use bitexact::GpuTensor;

const DIM: usize = 2048;
const EXPERTS: usize = 128;
const K: usize = 8;

fn main() {
    common::run_family("router", |dev, group, rows| {
        for n in [1usize, 8, 512, 2048] {
            let bytes = 4 * n * EXPERTS + 8 * n * K;
            let logits =
                GpuTensor::from_host(dev, &common::vals(n * EXPERTS, 1), &[n, EXPERTS]).unwrap();
            let mut ids = GpuTensor::<u32>::zeros(dev, &[n, K]).unwrap();
            let mut w = GpuTensor::zeros(dev, &[n, K]).unwrap();
            let name = "softmax_topk";
            common::bench_against_copy(group, dev, rows, "router", name, n, bytes, |_| {
                softmax_topk(dev, &logits, K, true, &mut ids, &mut w).unwrap();
            });
        }
        let q = QuantMatrix::quantize(
            WeightFormat::F32,
            &common::vals(EXPERTS * DIM, 2),
            1,
            EXPERTS,
            DIM,
        )
        .unwrap();
        let router = GpuMatrix::upload(dev, &q).unwrap();
        let mut counters = RouteCounters::new(dev, 8).unwrap();
        for n in [1usize, 8] {
            let bytes = 4 * EXPERTS * DIM + 4 * n * DIM;
            let x = GpuTensor::from_host(dev, &common::vals(n * DIM, 3), &[n, DIM]).unwrap();
            let mut logits = GpuTensor::zeros(dev, &[n, EXPERTS]).unwrap();
            let mut ids = GpuTensor::<u32>::zeros(dev, &[n, K]).unwrap();
            let mut w = GpuTensor::zeros(dev, &[n, K]).unwrap();
            common::bench_against_copy(group, dev, rows, "router", "route", n, bytes, |_| {
                route(
                    dev,
                    &x,
                    &router,
                    K,
                    true,
                    &mut counters,
                    &mut logits,
                    &mut ids,
                    &mut w,
                )
                .unwrap();
            });
        }

        format!(
            "router, {EXPERTS} experts top {K}, dim {DIM}, against a device copy of the same bytes"
        )
    });
}
