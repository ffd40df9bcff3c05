// The session's coded-cache writers of cuda/fastscan.cu under cuda_emu.h, in the geometry
// src/kernels/fastscan.rs launches them: fastscan_encode of positions pos0 .. pos0 + n from the
// staging rows [n_kv, cap, D] (absolute rows, the position read on the device), K then V, and
// f16kv_write of the same positions; over a case written by tests/parity/emulate.rs:
//   in:  u32 D n_kv cap tile_bytes head_bytes pos0 n, f32 k (1 / sqrt D), then vectors (u32
//        length first): f32 signs bounds rows_k rows_v, u8 cache_k cache_v, u16 kc vc
//   out: the same u8 and u16 vectors after the launches
#include <cstdio>
#include <fstream>

#include "case_io.h"
#include "cuda_emu.h"
#include "family.h"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    CaseIn in(argv[1]);
    const u32 D = in.u(), n_kv = in.u(), cap = in.u(), tile_bytes = in.u(), head_bytes = in.u();
    const u32 pos0 = in.u(), n = in.u();
    float k = 0.f;
    in.in.read(reinterpret_cast<char*>(&k), 4);
    const auto signs = in.vec<float>(), bounds = in.vec<float>(), rows_k = in.vec<float>(),
               rows_v = in.vec<float>();
    auto cache_k = in.vec<u8>(), cache_v = in.vec<u8>();
    auto kc = in.vec<u16>(), vc = in.vec<u16>();
    if (!in.in) return 3;
    std::vector<u32> pos(n);
    for (u32 i = 0; i < n; ++i) pos[i] = pos0 + i;
    const u32 slots = ((n + 32 - 2) / 32 + 1) * 16;
    for (auto [cache, x] : {std::pair{&cache_k, &rows_k}, std::pair{&cache_v, &rows_v}}) {
        emu_launch({(slots + 7) / 8, n_kv, 1}, 256, 0, [&] {
            fastscan_encode(cache->data(), x->data(), pos.data(), n, 1u, D, (u64)cap * D,
                            signs.data(), bounds.data(), (u32)bounds.size(), D, tile_bytes,
                            head_bytes, k);
        });
    }
    const u32 width = n_kv * D;
    emu_launch({(width + 255) / 256, std::min(n, 65535u), 1}, 256, 0, [&] {
        f16kv_write(kc.data(), vc.data(), rows_k.data(), rows_v.data(), pos.data(), n, n_kv, D,
                    cap);
    });
    std::ofstream out(argv[2], std::ios::binary);
    write_vec(out, cache_k);
    write_vec(out, cache_v);
    write_vec(out, kc);
    write_vec(out, vc);
    return out ? 0 : 4;
}
