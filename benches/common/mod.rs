//! Shared bench plumbing: the device (or a printed skip), timing through `iter_custom` with a
//! stream synchronize before each clock read, medians kept per benchmark, and the closing table
//! that sets each kernel against the device-to-device copy of the same bytes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitexact::Device;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};

/// Samples per benchmark; the recorder keeps the last this many (criterion's measurement
/// phase), dropping its warm-up calls.
pub const SAMPLES: usize = 20;

/// Criterion settings that fit a lease: short warm-up, 20 samples of about a second in all.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .configure_from_args()
}

/// The device, or `None` after printing `SKIP: no CUDA device`.
pub fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => {
            d.warm_up().expect("compiling the kernels");
            println!("device: {} ({})", d.name(), d.arch());
            Some(d)
        }
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

/// One family's bench: the device (or the printed skip), criterion and the family's group;
/// `body` benches into the group and the closing table's rows and returns the table's title,
/// printed with the device's name after the criterion summary.
pub fn run_family(
    family: &str,
    body: impl FnOnce(&Device, &mut BenchmarkGroup<'_, WallTime>, &mut Vec<Row>) -> String,
) {
    let Some(dev) = device() else { return };
    let mut c = criterion();
    let mut rows = Vec::new();
    let mut group = c.benchmark_group(family);
    let title = body(&dev, &mut group, &mut rows);
    group.finish();
    c.final_summary();
    print_table(&format!("{title} ({})", dev.name()), &rows);
}

static SAMPLES_NS: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Runs `f` `iters` times between two synchronizes and returns the elapsed time, recording the
/// per-iteration time under `key` for the closing table.
pub fn timed(dev: &Device, key: &str, iters: u64, mut f: impl FnMut(u64)) -> Duration {
    dev.synchronize().expect("synchronize");
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    dev.synchronize().expect("synchronize");
    let el = t.elapsed();
    SAMPLES_NS
        .lock()
        .unwrap()
        .entry(key.to_string())
        .or_default()
        .push(el.as_nanos() as f64 / iters.max(1) as f64);
    el
}

/// Median per-iteration time (ns) of `key` over its last [`SAMPLES`] samples.
pub fn median_ns(key: &str) -> Option<f64> {
    let map = SAMPLES_NS.lock().unwrap();
    let v = map.get(key)?;
    let mut last: Vec<f64> = v[v.len().saturating_sub(SAMPLES)..].to_vec();
    last.sort_by(f64::total_cmp);
    last.get(last.len() / 2).copied()
}

/// Number of buffer sets to rotate through so that one pass over all of them (`bytes` each)
/// exceeds the 50 MB L2 of an H100 several times over: timings then measure DRAM, not L2.
pub fn rotation(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes.max(1)).clamp(1, 16)
}

/// The buffer sets a bench rotates through for a kernel that moves `bytes` a call: [`rotation`]
/// of them, set `s` made by `make(s)`. Call `i` takes set `i % len`.
pub fn rotated<T>(bytes: usize, make: impl FnMut(usize) -> T) -> Vec<T> {
    (0..rotation(bytes)).map(make).collect()
}

/// Benchmarks under `key` the device-to-device copy that moves `bytes` in all (`bytes / 2` read
/// and as many written), rotating buffer pairs as [`rotation`] says: the ceiling a
/// memory-bound kernel that moves `bytes` is set against in [`print_table`].
pub fn bench_copy(
    group: &mut BenchmarkGroup<'_, WallTime>,
    dev: &Device,
    key: &str,
    id: BenchmarkId,
    bytes: usize,
) {
    let sets = rotation(bytes);
    let alloc = || -> Vec<_> {
        (0..sets)
            .map(|_| dev.stream().alloc_zeros::<u8>((bytes / 2).max(1)).unwrap())
            .collect()
    };
    let (src, mut dst) = (alloc(), alloc());
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            timed(dev, key, iters, |i| {
                let s = i as usize % sets;
                dev.stream().memcpy_dtod(&src[s], &mut dst[s]).unwrap()
            })
        })
    });
}

/// One row of the closing table.
pub struct Row {
    pub kernel: String,
    pub n: usize,
    pub bytes: usize,
    pub key: String,
    pub copy_key: String,
}

/// Prints the closing table: per row the median time, GB/s (bytes read + written, 10^9), the
/// copy rate of the same bytes measured in this run, and the ratio.
pub fn print_table(title: &str, rows: &[Row]) {
    println!();
    println!("## {title}");
    println!();
    println!("| kernel | N | bytes moved | median time | GB/s | copy GB/s | ratio to copy |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (Some(t), Some(tc)) = (median_ns(&r.key), median_ns(&r.copy_key)) else {
            continue;
        };
        let gbs = r.bytes as f64 / t;
        let copy = r.bytes as f64 / tc;
        println!(
            "| {} | {} | {:.2} MB | {:.2} us | {:.0} | {:.0} | {:.2} |",
            r.kernel,
            r.n,
            r.bytes as f64 / 1e6,
            t / 1e3,
            gbs,
            copy,
            gbs / copy
        );
    }
}

/// `n` deterministic values in about [-1.43, 1.43] (a multiplicative hash of the index and
/// `salt`): K, V and Q of the attention benches, never zeros.
pub fn vals(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 2_654_435_761 + salt) % 2_001) as f32 - 1_000.0) / 700.0)
        .collect()
}

/// Benchmarks `f` (its argument: the iteration, to rotate buffers) under `group/name/n` and a
/// device copy of the same `bytes` beside it, and adds the pair's row to `rows`: one
/// memory-bound kernel's line of the closing table.
#[allow(clippy::too_many_arguments)]
pub fn bench_against_copy(
    group: &mut BenchmarkGroup<'_, WallTime>,
    dev: &Device,
    rows: &mut Vec<Row>,
    family: &str,
    name: &str,
    n: usize,
    bytes: usize,
    mut f: impl FnMut(u64),
) {
    let key = format!("{family}/{name}/{n}");
    group.bench_function(BenchmarkId::new(name, n), |b| {
        b.iter_custom(|iters| timed(dev, &key, iters, &mut f))
    });
    let copy_key = format!("{family}/copy/{n}/{bytes}");
    if median_ns(&copy_key).is_none() {
        bench_copy(
            group,
            dev,
            &copy_key,
            BenchmarkId::new("copy", format!("{n}/{bytes}")),
            bytes,
        );
    }
    rows.push(Row {
        kernel: name.to_string(),
        n,
        bytes,
        key,
        copy_key,
    });
}
