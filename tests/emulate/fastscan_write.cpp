// The session's coded-cache writers of cuda/fastscan.cu under cuda_emu.h, in the geometry
// src/kernels/fastscan.rs launches them: fastscan_encode of positions pos0 .. pos0 + n from the
// staging rows [n_kv, cap, D] (absolute rows, the position read on the device), K then V, and
// f16kv_write of the same positions; over a case written by tests/parity/emulate.rs:
//   in:  u32 D n_kv cap tile_bytes head_bytes pos0 n, f32 k (1 / sqrt D), then vectors (u32
//        length first): f32 signs bounds rows_k rows_v, u8 cache_k cache_v, u16 kc vc
//   out: the same u8 and u16 vectors after the launches
#include <cstdio>
#include <fstream>

#include "cuda_emu.h"
#include "family.h"

static std::ifstream in;
static u32 rd_u() {
    u32 v = 0;
    in.read(reinterpret_cast<char*>(&v), 4);
    return v;
}
template <class T> static std::vector<T> rd_v() {
    std::vector<T> v(rd_u());
    in.read(reinterpret_cast<char*>(v.data()), sizeof(T) * v.size());
    return v;
}
template <class T> static void wr_v(std::ofstream& out, const std::vector<T>& v) {
    const u32 len = v.size();
    out.write(reinterpret_cast<const char*>(&len), 4);
    out.write(reinterpret_cast<const char*>(v.data()), sizeof(T) * v.size());
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    in.open(argv[1], std::ios::binary);
    const u32 D = rd_u(), n_kv = rd_u(), cap = rd_u(), tile_bytes = rd_u(), head_bytes = rd_u();
    const u32 pos0 = rd_u(), n = rd_u();
    float k = 0.f;
    in.read(reinterpret_cast<char*>(&k), 4);
    const auto signs = rd_v<float>(), bounds = rd_v<float>(), rows_k = rd_v<float>(),
               rows_v = rd_v<float>();
    auto cache_k = rd_v<u8>(), cache_v = rd_v<u8>();
    auto kc = rd_v<u16>(), vc = rd_v<u16>();
    if (!in) return 3;
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
    wr_v(out, cache_k);
    wr_v(out, cache_v);
    wr_v(out, kc);
    wr_v(out, vc);
    return out ? 0 : 4;
}
