//! Kernels run on the CPU under a CUDA emulator (`tests/emulate/cuda_emu.h`: a launch's blocks
//! in order, a block's threads as OS threads with their barriers and warp shuffles, the GPU's
//! IEEE f32 operations), against their references bit for bit: a check of a kernel's indexing
//! and operation order that needs no GPU, so CI runs it. It cannot see races between blocks
//! (they never overlap) or anything of the memory model: the GPU tests do.
//!
//! The family's source (`cuda/common.cuh` + `cuda/FAMILY.cu`) compiles with the host's C++
//! compiler (`CXX`, else `g++`; C++20, `-ffp-contract=off`) beside a driver
//! (`tests/emulate/*.cpp`) that launches the kernels as `src/kernels/` does. Without a compiler
//! the tests print `SKIP: no C++ compiler` and pass, unless `BITEXACT_REQUIRE_EMU=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use bitexact::quant::WeightFormat;
use bitexact::reference::delta_net::{
    scan_chunked_cpu, ChunkedState, DeltaNetConfig, DeltaNetWeights, SCAN_CHUNK,
};

use crate::common::{assert_bits_eq, values};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The C++ compiler, or `None` after printing why (a panic under `BITEXACT_REQUIRE_EMU=1`).
fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let sources = Path::new(ROOT).join("tests/emulate/cuda_emu.h").exists();
    if ok && sources {
        return Some(cxx);
    }
    let why = if ok {
        format!("the sources are not at {ROOT}")
    } else {
        format!("`{cxx} --version` did not run")
    };
    if std::env::var("BITEXACT_REQUIRE_EMU").is_ok_and(|v| v == "1") {
        panic!("BITEXACT_REQUIRE_EMU=1 but no C++ compiler for the emulated kernels: {why}");
    }
    println!("SKIP: no C++ compiler for the emulated kernels ({why})");
    None
}

/// `family`'s kernels with `driver` as one program: `cuda/common.cuh` and `cuda/FAMILY.cu`
/// with their dynamic shared memory taken from the emulator, compiled as the mutant
/// (`BITEXACT_MUTANT`) when `mutant`.
fn build(family: &str, driver: &str, mutant: bool) -> Option<PathBuf> {
    let cxx = compiler()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "emulate-{family}-{}-{}",
        driver.trim_end_matches(".cpp"),
        if mutant { "mutant" } else { "plain" }
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &str| std::fs::read_to_string(Path::new(ROOT).join(p)).unwrap();
    let mut text = read("cuda/common.cuh");
    text.push('\n');
    text.push_str(&for_host(&read(&format!("cuda/{family}.cu"))));
    let text = text.replace("#include \"common.cuh\"", "");
    std::fs::write(dir.join("family.h"), text).unwrap();
    let bin = dir.join("driver");
    let mut cmd = Command::new(cxx);
    cmd.args([
        "-std=c++20",
        "-O2",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-pthread",
        "-w",
    ])
    .arg("-I")
    .arg(&dir)
    .arg("-I")
    .arg(Path::new(ROOT).join("tests/emulate"))
    .arg("-o")
    .arg(&bin)
    .arg(Path::new(ROOT).join("tests/emulate").join(driver));
    if mutant {
        cmd.arg("-DBITEXACT_MUTANT");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "compiling the emulated {family} kernels:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

/// A family's source as the host compiler takes it: `extern __shared__ [__align__(N)] float
/// NAME[];` as the emulator's dynamic shared memory, the PTX f16 conversions as its calls, the
/// cp.async copies as plain copies (their groups and waits as nothing).
fn for_host(src: &str) -> String {
    src.lines()
        .map(|line| {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("extern __shared__ ") {
                let rest = rest
                    .trim_start_matches(|c: char| c != 'f')
                    .strip_prefix("float ")
                    .expect("a float array");
                let name = &rest[..rest.find('[').expect("NAME[]")];
                return format!("    float* {name} = emu_dynamic_smem();");
            }
            match t {
                r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));"# => {
                    "    h = emu_f32_to_f16(f);".into()
                }
                r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"# => {
                    "    f = emu_f16_to_f32(h);".into()
                }
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            r#"asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem));"#,
            "std::memcpy(smem, gmem, 4);",
        )
        .replace(
            r#"asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(gmem));"#,
            "std::memcpy(smem, gmem, 8);",
        )
        .replace(
            r#"asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem));"#,
            "std::memcpy(smem, gmem, 16);",
        )
        .replace(r#"asm volatile("cp.async.commit_group;");"#, ";")
        .replace(
            r#"asm volatile("cp.async.wait_group 0;" ::: "memory");"#,
            ";",
        )
        .replace(
            r#"asm volatile("cp.async.wait_group 1;" ::: "memory");"#,
            ";",
        )
}

/// `family`'s driver `file`, built once per process (as the family's mutant when `mutant`, or
/// when `BITEXACT_MUTANT` names the family, as the device layer compiles it).
fn driver(family: &str, file: &str, mutant: bool) -> Option<PathBuf> {
    static BUILT: Mutex<BTreeMap<String, Option<PathBuf>>> = Mutex::new(BTreeMap::new());
    let mutant = mutant || std::env::var("BITEXACT_MUTANT").is_ok_and(|v| v == family);
    let key = format!("{family}/{file}/{mutant}");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    built
        .entry(key)
        .or_insert_with(|| build(family, file, mutant))
        .clone()
}

/// The emulated chunked scan's outputs and final state over `n` tokens in calls of `pieces`
/// (cycled), and the reference's; `None` without a compiler.
fn run_chunked(
    driver: &Path,
    c: &DeltaNetConfig,
    n: usize,
    pieces: &[usize],
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let w = DeltaNetWeights::generate(c, seed, 500).unwrap();
    let (cd, hv) = (c.conv_dim(), c.v_heads);
    let mixed = values(seed ^ 1, n * cd, 2.0, 0.0);
    let b = values(seed ^ 2, n * hv, 2.0, 0.0);
    let a = values(seed ^ 3, n * hv, 2.0, 0.0);
    let mut st = ChunkedState::new(c);
    let o = scan_chunked_cpu(&w, &mut st, &mixed, &b, &a, n, 1e-6);
    let want = vec![
        o,
        st.base.conv,
        st.base.m,
        st.k,
        st.u,
        st.f,
        st.e,
        vec![f32::from_bits(st.len as u32)],
    ];
    let mut case = Vec::new();
    let dims = [
        c.k_heads,
        c.v_heads,
        c.head_dim,
        c.conv_kernel,
        n,
        pieces.len(),
    ];
    for v in dims.iter().chain(pieces) {
        case.extend((*v as u32).to_le_bytes());
    }
    for v in [&w.conv, &w.dt_bias, &w.ssm_a, &mixed, &b, &a] {
        case.extend((v.len() as u32).to_le_bytes());
        v.iter().for_each(|x| case.extend(x.to_le_bytes()));
    }
    let tag = format!("{seed}-{n}-{}-{}", c.head_dim, pieces.len());
    let bytes = run_driver(driver, &case, &tag);
    let words: Vec<u32> = bytes
        .chunks(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let (mut got, mut at) = (Vec::new(), 0);
    for _ in 0..7 {
        let len = words[at] as usize;
        got.push(
            words[at + 1..at + 1 + len]
                .iter()
                .map(|&w| f32::from_bits(w))
                .collect(),
        );
        at += 1 + len;
    }
    got.push(vec![f32::from_bits(words[at])]);
    (got, want)
}

/// Runs `driver` on the case bytes `case` (files tagged `tag` beside it): its output bytes.
fn run_driver(driver: &Path, case: &[u8], tag: &str) -> Vec<u8> {
    let dir = driver.parent().unwrap();
    let (inp, outp) = (
        dir.join(format!("in-{tag}")),
        dir.join(format!("out-{tag}")),
    );
    std::fs::write(&inp, case).unwrap();
    let run = Command::new(driver).arg(&inp).arg(&outp).output().unwrap();
    assert!(run.status.success(), "the emulated driver failed: {run:?}");
    let bytes = std::fs::read(&outp).unwrap();
    let _ = std::fs::remove_file(inp);
    let _ = std::fs::remove_file(outp);
    bytes
}

fn cfg(k_heads: usize, v_heads: usize, head_dim: usize, conv: usize) -> DeltaNetConfig {
    DeltaNetConfig {
        dim: 64,
        k_heads,
        v_heads,
        head_dim,
        conv_kernel: conv,
        format: WeightFormat::F32,
    }
}

const PARTS: [&str; 8] = [
    "o", "window", "matrices", "keys", "u", "factors", "decay", "length",
];

/// The chunked order's kernels (`delta_net_chunk_*` after the prep; a call of one token the
/// one-launch `delta_net_chunk_decode_f32`), emulated, equal `scan_chunked_cpu` in the outputs
/// and the whole state: head dims 3, 16, 20, 40, 48 (a partial second block), 100 (a partial
/// fourth) and 128; windows 1-4; token counts around one and two chunk boundaries; calls of all
/// tokens, one (decode, a chunk folded by the decode kernel), 7, a chunk and mixed pieces that
/// start and end inside chunks.
#[test]
fn emulated_delta_net_chunked_equals_reference() {
    let Some(driver) = driver("delta_net", "delta_net_chunk.cpp", false) else {
        return;
    };
    let c = SCAN_CHUNK;
    let cases: [(DeltaNetConfig, usize, &[usize]); 10] = [
        (cfg(2, 4, 16, 4), 2 * c + 5, &[2 * c + 5]),
        (cfg(2, 4, 16, 4), 2 * c + 5, &[5, c + 3, 1, 30]),
        (cfg(1, 3, 48, 2), c + 1, &[7]),
        (cfg(2, 2, 100, 1), c - 1, &[c - 1]),
        (cfg(1, 1, 3, 1), 2 * c + 2, &[c]),
        (cfg(1, 2, 128, 4), c, &[c]),
        (cfg(1, 2, 128, 4), c + 1, &[40, 25]),
        (cfg(3, 9, 20, 3), 90, &[80, 13]),
        (cfg(1, 2, 128, 4), c + 3, &[60, 1]),
        (cfg(2, 6, 40, 2), 9, &[1]),
    ];
    for (i, (cf, n, pieces)) in cases.iter().enumerate() {
        let (got, want) = run_chunked(&driver, cf, *n, pieces, 20 + i as u64);
        for ((part, g), w) in PARTS.iter().zip(&got).zip(&want) {
            assert_bits_eq(
                &format!("emulated chunked {cf:?} n={n} pieces={pieces:?}: {part}"),
                g,
                w,
            );
        }
    }
}

/// The same check catches the family's mutant (bx_tree4 left to right): a test of these
/// kernels that can fail.
#[test]
fn emulated_delta_net_chunked_mutant_is_caught() {
    let Some(driver) = driver("delta_net", "delta_net_chunk.cpp", true) else {
        return;
    };
    let (got, want) = run_chunked(&driver, &cfg(1, 2, 128, 4), 70, &[70], 5);
    assert!(
        got[..7]
            .iter()
            .zip(&want)
            .any(|(g, w)| g.iter().zip(w).any(|(a, b)| a.to_bits() != b.to_bits())),
        "the mutant's bits equal the reference's"
    );
}

/// The session's coded-cache writers (`fastscan_encode` from the staging rows, the position
/// read on the device; `f16kv_write`), emulated, equal the reference's encoding and f16 bits:
/// head dims 64, 128 and 256, 3 and 4 bits, runs of positions that start and end inside tiles
/// and cross them, one position (a decode step); caches that start full of other bytes (an
/// untouched nibble or row must keep them); rows with NaN, infinities and subnormals.
#[test]
fn emulated_fastscan_writers_equal_reference() {
    use bitexact::quant::fastscan::{codebook, FastScanSpec};
    use bitexact::reference::fastscan::{encode, f16_bits};
    let Some(driver) = driver("fastscan", "fastscan_write.cpp", false) else {
        return;
    };
    for (i, &(d, bits, n_kv, cap, pos0, n)) in [
        (64usize, 4u32, 2usize, 96usize, 0usize, 5usize),
        (128, 3, 3, 128, 37, 40),
        (256, 4, 1, 64, 31, 2),
        (128, 4, 2, 96, 63, 1),
        (64, 3, 1, 64, 0, 64),
    ]
    .iter()
    .enumerate()
    {
        let seed = 40 + i as u64;
        let spec = FastScanSpec::new(d, bits, seed).unwrap();
        let cb = codebook(d, bits);
        let rows_k = values(seed ^ 1, n_kv * cap * d, 2.0, 0.02);
        let rows_v = values(seed ^ 2, n_kv * cap * d, 2.0, 0.02);
        let hb = spec.cache_bytes(cap);
        let bytes = |salt: u64, len: usize| -> Vec<u8> {
            values(seed ^ salt, len, 1.0, 0.0)
                .iter()
                .map(|v| (v.to_bits() >> 7) as u8)
                .collect()
        };
        let (cache_k, cache_v) = (bytes(3, n_kv * hb), bytes(4, n_kv * hb));
        let halves = |salt: u64| -> Vec<u16> {
            values(seed ^ salt, n_kv * cap * d, 1.0, 0.0)
                .iter()
                .map(|v| (v.to_bits() >> 9) as u16)
                .collect()
        };
        let (kc, vc) = (halves(5), halves(6));
        let mut want = [cache_k.clone(), cache_v.clone()];
        for (w, rows) in want.iter_mut().zip([&rows_k, &rows_v]) {
            for h in 0..n_kv {
                let x = &rows[(h * cap + pos0) * d..(h * cap + pos0 + n) * d];
                encode(&spec, &cb, &mut w[h * hb..(h + 1) * hb], x, pos0);
            }
        }
        let mut want_f16 = [kc.clone(), vc.clone()];
        for (w, rows) in want_f16.iter_mut().zip([&rows_k, &rows_v]) {
            for h in 0..n_kv {
                for p in pos0..pos0 + n {
                    for j in 0..d {
                        let at = (h * cap + p) * d + j;
                        w[at] = f16_bits(rows[at]);
                    }
                }
            }
        }
        let mut case = Vec::new();
        for v in [d, n_kv, cap, spec.tile_bytes(), hb, pos0, n] {
            case.extend((v as u32).to_le_bytes());
        }
        case.extend(spec.inv_sqrt_d().to_le_bytes());
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let u16s = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (raw, len) in [
            (f32s(&spec.signs()), d),
            (f32s(&cb.bounds), cb.bounds.len()),
            (f32s(&rows_k), rows_k.len()),
            (f32s(&rows_v), rows_v.len()),
            (cache_k.clone(), cache_k.len()),
            (cache_v.clone(), cache_v.len()),
            (u16s(&kc), kc.len()),
            (u16s(&vc), vc.len()),
        ] {
            case.extend((len as u32).to_le_bytes());
            case.extend(raw);
        }
        let out = run_driver(&driver, &case, &format!("fastscan-{i}"));
        let mut at = 0;
        let mut take = |width: usize| -> Vec<u8> {
            let len = u32::from_le_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            let v = out[at + 4..at + 4 + len * width].to_vec();
            at += 4 + len * width;
            v
        };
        let what = format!("emulated fastscan writers D={d} bits={bits} pos {pos0}..+{n}");
        for (part, w) in ["K codes", "V codes"].iter().zip(&want) {
            let got = take(1);
            let diff = got.iter().zip(w).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff,
                0,
                "{what}: {part}: {diff} of {} bytes differ",
                w.len()
            );
        }
        for (part, w) in ["K f16", "V f16"].iter().zip(&want_f16) {
            let got: Vec<u16> = take(2)
                .chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            let diff = got.iter().zip(w).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{what}: {part}: {diff} of {} differ", w.len());
        }
    }
}

/// The recurrence's scans (v1; the prep then v2, v3, v5 and v6), emulated, equal `scan_cpu`
/// in the outputs, the window and the matrices: head dims 16, 48 and 128 (v5's and v6's
/// whole-block path), token counts around v3's 16-token staging (16, 17, 33), calls of all
/// tokens, one and five. v5 and v6 had run on no GPU when this was written.
#[test]
fn emulated_delta_net_scans_equal_reference() {
    use bitexact::reference::delta_net::{scan_cpu, DeltaNetState};
    let Some(driver) = driver("delta_net", "delta_net_scan.cpp", false) else {
        return;
    };
    let cases: [(DeltaNetConfig, usize, &[usize]); 6] = [
        (cfg(2, 4, 16, 4), 23, &[23]),
        (cfg(2, 4, 16, 4), 6, &[1]),
        (cfg(1, 3, 48, 2), 9, &[5]),
        (cfg(1, 2, 128, 4), 16, &[16]),
        (cfg(1, 2, 128, 4), 17, &[17]),
        (cfg(2, 2, 128, 1), 33, &[33]),
    ];
    for (i, (c, n, pieces)) in cases.iter().enumerate() {
        let seed = 60 + i as u64;
        let w = DeltaNetWeights::generate(c, seed, 500).unwrap();
        let (cd, hv) = (c.conv_dim(), c.v_heads);
        let mixed = values(seed ^ 1, n * cd, 2.0, 0.0);
        let b = values(seed ^ 2, n * hv, 2.0, 0.0);
        let a = values(seed ^ 3, n * hv, 2.0, 0.0);
        let mut st = DeltaNetState::new(c);
        let o = scan_cpu(&w, &mut st, &mixed, &b, &a, *n, 1e-6);
        for version in [1u32, 2, 3, 5, 6] {
            let mut case = Vec::new();
            let dims = [
                version as usize,
                c.k_heads,
                hv,
                c.head_dim,
                c.conv_kernel,
                *n,
            ];
            for v in dims.iter().chain([&pieces.len()]).chain(pieces.iter()) {
                case.extend((*v as u32).to_le_bytes());
            }
            for v in [&w.conv, &w.dt_bias, &w.ssm_a, &mixed, &b, &a] {
                case.extend((v.len() as u32).to_le_bytes());
                v.iter().for_each(|x| case.extend(x.to_le_bytes()));
            }
            let bytes = run_driver(&driver, &case, &format!("scan-{i}-{version}"));
            let words: Vec<f32> = bytes
                .chunks(4)
                .map(|w| f32::from_bits(u32::from_le_bytes(w.try_into().unwrap())))
                .collect();
            let mut at = 0;
            let what = format!("emulated scan v{version} {c:?} n={n} pieces={pieces:?}");
            for (part, want) in [("o", &o), ("window", &st.conv), ("matrices", &st.m)] {
                let len = words[at].to_bits() as usize;
                assert_bits_eq(
                    &format!("{what}: {part}"),
                    &words[at + 1..at + 1 + len],
                    want,
                );
                at += 1 + len;
            }
        }
    }
}
