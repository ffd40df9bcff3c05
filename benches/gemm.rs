//! Bench of the matrix products (`cuda/gemm.cu`) in every weight format, against cuBLAS and the
//! copy ceiling measured in the same run.
//!
//! Napkin math:
//! - GEMM-N, `y[N, M] = x[N, K] · W[M, K]ᵀ`: `2 N M K` flops. At M = K = 2048 and N = 512 that
//!   is 4.3 GFLOP: about 9 us at cuBLAS bf16's ~500 TFLOP/s on large shapes, 85 us at the
//!   ~50 TFLOP/s of FP32 FFMA. The quantized kernels must also pay a per-32-block float epilogue
//!   (one multiply, one conversion, one or two fmas per output and block), so their ceiling is
//!   the CUDA cores' rate over those 3-4 operations, about 32 tensor MACs each.
//! - GEMV (N = 1): every weight byte read once; the ceiling is the device-to-device copy rate
//!   over the weight bytes (read + write counted, as for the copy).
//! - Grouped MoE layer, 512 tokens, top-8: gate, up and down of every routed row,
//!   `2 * 512 * 8 * 3 * dim * ffn` flops; compared with cuBLAS bf16 on one dense product of the
//!   same rows (4096 rows) and shapes.

mod common;

use bitexact::kernels::gemm::{
    matmul_grouped_with, matmul_with, GpuMatrix, MatmulKernel, RoutedRows,
};
use bitexact::quant::{QuantMatrix, WeightFormat};
use bitexact::{Device, GpuTensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;

const TOKENS: [usize; 6] = [1, 8, 64, 256, 512, 4096];

/// Deterministic, non-zero values without the cost of hashing every element of a large matrix:
/// 61 distinct rows tiled.
fn pattern(rows: usize, cols: usize) -> Vec<f32> {
    let base: Vec<f32> = (0..61 * cols)
        .map(|i| (((i as u64).wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    (0..rows)
        .flat_map(|r| base[(r % 61) * cols..][..cols].iter().copied())
        .collect()
}

fn cublas_cfg<T>(n: usize, m: usize, k: usize, alpha: T, beta: T) -> GemmConfig<T> {
    // Row-major y[N, M] = x[N, K] · W[M, K]^T is column-major y^T = W · x^T.
    GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha,
        lda: k as i32,
        ldb: k as i32,
        beta,
        ldc: m as i32,
    }
}

struct Flops {
    rows: Vec<(String, usize, String, String)>, // (kernel, N, key, shape)
}

fn bench_dense(c: &mut Criterion, dev: &Device, blas: &CudaBlas, table: &mut Flops) {
    let (m, k) = (2048usize, 2048usize);
    let mut group = c.benchmark_group("gemm_2048x2048");
    let w_vals = pattern(m, k);
    let weights: Vec<(WeightFormat, GpuMatrix)> = WeightFormat::ALL
        .iter()
        .map(|&f| {
            let q = QuantMatrix::quantize(f, &w_vals, 1, m, k).unwrap();
            (f, GpuMatrix::upload(dev, &q).unwrap())
        })
        .collect();
    let w32 = dev.stream().clone_htod(&w_vals).unwrap();
    let wbf: Vec<bf16> = w_vals.iter().map(|&v| bf16::from_f32(v)).collect();
    let wbf = dev.stream().clone_htod(&wbf).unwrap();
    for &n in &TOKENS {
        let xh = pattern(n, k);
        let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
        let mut y = GpuTensor::zeros(dev, &[n, m]).unwrap();
        group.throughput(Throughput::Elements((2 * n * m * k) as u64));
        let shape = format!("{m}x{k}");
        for (f, w) in &weights {
            let key = format!("dense/{f}/{n}");
            group.bench_function(BenchmarkId::new(f.name(), n), |b| {
                b.iter_custom(|iters| {
                    common::timed(dev, &key, iters, |_| {
                        matmul_with(dev, MatmulKernel::Auto, &x, w, &mut y).unwrap()
                    })
                })
            });
            table
                .rows
                .push((format!("bitexact {f}"), n, key, shape.clone()));
        }
        let x32 = dev.stream().clone_htod(&xh).unwrap();
        let mut y32 = dev.stream().alloc_zeros::<f32>(n * m).unwrap();
        let key = format!("dense/cublas-f32/{n}");
        group.bench_function(BenchmarkId::new("cublas-sgemm", n), |b| {
            b.iter_custom(|iters| {
                common::timed(dev, &key, iters, |_| {
                    // SAFETY: w32 is [m, k], x32 [n, k], y32 [n, m], as the config states.
                    unsafe { blas.gemm(cublas_cfg(n, m, k, 1.0f32, 0.0), &w32, &x32, &mut y32) }
                        .unwrap()
                })
            })
        });
        table
            .rows
            .push(("cuBLAS SGEMM".into(), n, key, shape.clone()));
        let xbf: Vec<bf16> = xh.iter().map(|&v| bf16::from_f32(v)).collect();
        let xbf = dev.stream().clone_htod(&xbf).unwrap();
        let mut ybf = dev.stream().alloc_zeros::<bf16>(n * m).unwrap();
        let key = format!("dense/cublas-bf16/{n}");
        let (one, zero) = (bf16::ONE, bf16::ZERO);
        group.bench_function(BenchmarkId::new("cublas-bf16", n), |b| {
            b.iter_custom(|iters| {
                common::timed(dev, &key, iters, |_| {
                    // SAFETY: wbf is [m, k], xbf [n, k], ybf [n, m], as the config states.
                    unsafe { blas.gemm(cublas_cfg(n, m, k, one, zero), &wbf, &xbf, &mut ybf) }
                        .unwrap()
                })
            })
        });
        table
            .rows
            .push(("cuBLAS bf16 (f32 accumulate)".into(), n, key, shape.clone()));
    }
    group.finish();
}

/// GEMV (N = 1) over the weight bytes, against a copy of the same bytes; buffers rotate so the
/// working set exceeds L2.
fn bench_gemv(c: &mut Criterion, dev: &Device, rows: &mut Vec<common::Row>) {
    let mut group = c.benchmark_group("gemv");
    let shapes: [(&str, usize, usize, &[WeightFormat]); 2] = [
        ("expert 768x2048", 768, 2048, &WeightFormat::ALL),
        (
            "lm-head 151936x2048",
            151_936,
            2048,
            &[
                WeightFormat::BF16,
                WeightFormat::Q8_0,
                WeightFormat::Q4K,
                WeightFormat::Q6K,
            ],
        ),
    ];
    for (name, m, k, formats) in shapes {
        let w_vals = pattern(m, k);
        let xh = pattern(1, k);
        let x = GpuTensor::from_host(dev, &xh, &[1, k]).unwrap();
        let mut y = GpuTensor::zeros(dev, &[1, m]).unwrap();
        for &f in formats {
            let q = QuantMatrix::quantize(f, &w_vals, 1, m, k).unwrap();
            let bytes = q.bytes().len();
            let sets = common::rotation(bytes);
            let ws: Vec<GpuMatrix> = (0..sets)
                .map(|_| GpuMatrix::upload(dev, &q).unwrap())
                .collect();
            // GemvMma beside Auto where it runs another kernel (Q8_0 below 16384 rows, Q6_K):
            // the A/B that decides Auto's dispatch.
            let kernels: &[MatmulKernel] = match f {
                WeightFormat::Q8_0 | WeightFormat::Q6K => {
                    &[MatmulKernel::Auto, MatmulKernel::GemvMma]
                }
                _ => &[MatmulKernel::Auto],
            };
            let copy_key = format!("gemv/{name}/{f}/copy");
            let id = BenchmarkId::new(format!("{name} {f} copy"), 1);
            common::bench_copy(&mut group, dev, &copy_key, id, bytes);
            for &kernel in kernels {
                group.throughput(Throughput::Bytes(bytes as u64));
                let key = format!("gemv/{name}/{f}/{kernel:?}");
                group.bench_function(BenchmarkId::new(format!("{name} {f} {kernel:?}"), 1), |b| {
                    b.iter_custom(|iters| {
                        common::timed(dev, &key, iters, |i| {
                            matmul_with(dev, kernel, &x, &ws[i as usize % sets], &mut y).unwrap()
                        })
                    })
                });
                rows.push(common::Row {
                    kernel: format!("GEMV {f} ({kernel:?}), {name}"),
                    n: 1,
                    bytes,
                    key,
                    copy_key: copy_key.clone(),
                });
            }
        }
    }
    group.finish();
}

/// One MoE layer's expert products for 512 and 2048 tokens (gate, up, down through
/// `matmul_grouped`; prefill's two lengths).
fn bench_grouped(c: &mut Criterion, dev: &Device, blas: &CudaBlas, table: &mut Flops) {
    let mut group = c.benchmark_group("moe_grouped");
    let (dim, k_top) = (2048usize, 8usize);
    for (n, name, ne, ffn) in [
        (512usize, "128 experts, ffn 768", 128usize, 768usize),
        (512, "256 experts, ffn 512", 256, 512),
        (2048, "128 experts, ffn 768", 128, 768),
        (2048, "256 experts, ffn 512", 256, 512),
    ] {
        // A deterministic spread routing: token t to experts (t * 7 + 13 j) % ne.
        let mut xr = Vec::new();
        let mut ex = Vec::new();
        for t in 0..n {
            for j in 0..k_top {
                xr.push(t as u32);
                ex.push(((t * 7 + 13 * j) % ne) as u32);
            }
        }
        let r = xr.len();
        let rows_id: Vec<u32> = (0..r as u32).collect();
        let up_rows = RoutedRows::new(dev, &xr, &ex, &rows_id, n, ne, r).unwrap();
        let down_rows = RoutedRows::new(dev, &rows_id, &ex, &rows_id, r, ne, r).unwrap();
        let x = GpuTensor::from_host(dev, &pattern(n, dim), &[n, dim]).unwrap();
        let h = GpuTensor::from_host(dev, &pattern(r, ffn), &[r, ffn]).unwrap();
        let mut g = GpuTensor::zeros(dev, &[r, ffn]).unwrap();
        let mut out = GpuTensor::zeros(dev, &[r, dim]).unwrap();
        let flops = 2 * r * 3 * dim * ffn;
        group.throughput(Throughput::Elements(flops as u64));
        let wg_vals = pattern(ne * ffn, dim);
        let wd_vals = pattern(ne * dim, ffn);
        for f in [
            WeightFormat::F32,
            WeightFormat::BF16,
            WeightFormat::Q8_0,
            WeightFormat::Q4K,
            WeightFormat::Q6K,
        ] {
            let wg = GpuMatrix::upload(
                dev,
                &QuantMatrix::quantize(f, &wg_vals, ne, ffn, dim).unwrap(),
            )
            .unwrap();
            let wd = GpuMatrix::upload(
                dev,
                &QuantMatrix::quantize(f, &wd_vals, ne, dim, ffn).unwrap(),
            )
            .unwrap();
            let key = format!("grouped/{name}/{n}/{f}");
            group.bench_function(BenchmarkId::new(format!("{name} {f}"), n), |b| {
                b.iter_custom(|iters| {
                    common::timed(dev, &key, iters, |_| {
                        matmul_grouped_with(dev, MatmulKernel::Auto, &x, &wg, &up_rows, &mut g)
                            .unwrap();
                        matmul_grouped_with(dev, MatmulKernel::Auto, &x, &wg, &up_rows, &mut g)
                            .unwrap();
                        matmul_grouped_with(dev, MatmulKernel::Auto, &h, &wd, &down_rows, &mut out)
                            .unwrap();
                    })
                })
            });
            table
                .rows
                .push((format!("grouped {f}"), n, key, name.to_string()));
        }
        // The same flops as dense cuBLAS bf16 products over all n * 8 routed rows.
        let filled = |v: f32, len: usize| {
            let host = vec![bf16::from_f32(v); len];
            dev.stream().clone_htod(&host).unwrap()
        };
        let (wgb, wdb) = (filled(0.01, ffn * dim), filled(0.01, dim * ffn));
        let (xb, hb) = (filled(0.5, r * dim), filled(0.5, r * ffn));
        let mut gb = dev.stream().alloc_zeros::<bf16>(r * ffn).unwrap();
        let mut ob = dev.stream().alloc_zeros::<bf16>(r * dim).unwrap();
        let key = format!("grouped/{name}/{n}/cublas-bf16-dense");
        let (one, zero) = (bf16::ONE, bf16::ZERO);
        group.bench_function(
            BenchmarkId::new(format!("{name} cublas-bf16 dense"), n),
            |b| {
                b.iter_custom(|iters| {
                    common::timed(dev, &key, iters, |_| {
                        // SAFETY: the buffers have the shapes the configs state.
                        unsafe {
                            blas.gemm(cublas_cfg(r, ffn, dim, one, zero), &wgb, &xb, &mut gb)
                                .unwrap();
                            blas.gemm(cublas_cfg(r, ffn, dim, one, zero), &wgb, &xb, &mut gb)
                                .unwrap();
                            blas.gemm(cublas_cfg(r, dim, ffn, one, zero), &wdb, &hb, &mut ob)
                                .unwrap();
                        }
                    })
                })
            },
        );
        table.rows.push((
            "dense cuBLAS bf16, same flops".into(),
            n,
            key,
            name.to_string(),
        ));
    }
    group.finish();
}

fn print_flops(table: &Flops) {
    println!();
    println!("## Matrix products, FLOP/s against cuBLAS measured in this run");
    println!();
    println!("| kernel | shape | N | median time | TFLOP/s | vs cuBLAS bf16 | vs cuBLAS SGEMM |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (kernel, n, key, shape) in &table.rows {
        let Some(t) = common::median_ns(key) else {
            continue;
        };
        let flops = if key.starts_with("grouped/") {
            let (dim, ffn) = if shape.contains("768") {
                (2048.0, 768.0)
            } else {
                (2048.0, 512.0)
            };
            2.0 * (*n as f64) * 8.0 * 3.0 * dim * ffn
        } else {
            2.0 * (*n as f64) * 2048.0 * 2048.0
        };
        let base = |what: &str| {
            let k = if key.starts_with("grouped/") {
                format!("grouped/{shape}/{n}/cublas-bf16-dense")
            } else {
                format!("dense/{what}/{n}")
            };
            common::median_ns(&k).map_or("-".to_string(), |b| format!("{:.2}", b / t))
        };
        let sgemm = if key.starts_with("grouped/") {
            "-".to_string()
        } else {
            base("cublas-f32")
        };
        println!(
            "| {kernel} | {shape} | {n} | {:.1} us | {:.1} | {} | {} |",
            t / 1e3,
            flops / t / 1e3,
            base("cublas-bf16"),
            sgemm
        );
    }
}

fn main() {
    let Some(dev) = common::device() else { return };
    let blas = CudaBlas::new(dev.stream().clone()).expect("cuBLAS");
    let mut c = common::criterion();
    let mut table = Flops { rows: Vec::new() };
    let mut gemv_rows = Vec::new();
    bench_dense(&mut c, &dev, &blas, &mut table);
    bench_gemv(&mut c, &dev, &mut gemv_rows);
    bench_grouped(&mut c, &dev, &blas, &mut table);
    c.final_summary();
    print_flops(&table);
    common::print_table(
        &format!(
            "GEMV, weight bytes against the copy of the same bytes ({})",
            dev.name()
        ),
        &gemv_rows,
    );
}
