// The chunked DeltaNet order's launches (delta_net_prep_f32, delta_net_chunk_gram_f32,
// delta_net_chunk_scan_f32, delta_net_chunk_finish_f32, the window's copy; a call of one token:
// delta_net_chunk_decode_f32 and the copy) under cuda_emu.h, in the order and geometry
// src/kernels/delta_net.rs's scan_chunked launches them, over a case written by
// tests/parity/emulate.rs:
//   in:  u32 hk hv s kc n pieces, u32 piece[pieces], then f32 vectors (u32 length first):
//        conv_w dt_bias ssm_a mixed b a
//   out: f32 vectors o conv m k u f e, then u32 len
#include <cstdio>
#include <fstream>

#include "case_io.h"
#include "cuda_emu.h"
#include "family.h"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    CaseIn in(argv[1]);
    const u32 hk = in.u(), hv = in.u(), s = in.u(), kc = in.u(), n = in.u(), np = in.u();
    std::vector<u32> pieces(np);
    for (auto& p : pieces) p = in.u();
    const auto conv_w = in.vec<float>(), dt_bias = in.vec<float>(), ssm_a = in.vec<float>(), mixed = in.vec<float>(), bg = in.vec<float>(),
               ag = in.vec<float>();
    if (!in.in || np == 0) return 3;
    const u32 C = 64, cd = (2 * hk + hv) * s, rows = kc > 1 ? kc - 1 : 1;
    const float poison = __uint_as_float(0x7fa5a5a5u);
    std::vector<float> conv(rows * cd, 0.f), conv_next(rows * cd, 0.f), m(hv * s * s, 0.f);
    std::vector<float> ck(hk * C * s, 0.f), cu(hv * C * s, 0.f), cf(hv * C, 0.f), ce(hv, 0.f);
    std::vector<u32> clen(1, 0), ticket(1, 0);
    std::vector<float> o_all;
    for (u32 t0 = 0, i = 0; t0 < n; ++i) {
        const u32 cnt = std::min(pieces[i % np], n - t0);
        const float* mx = mixed.data() + (size_t)t0 * cd;
        const float* b = bg.data() + (size_t)t0 * hv;
        const float* a = ag.data() + (size_t)t0 * hv;
        std::vector<float> prep(cnt * cd, poison), gates(cnt * hv * 2, poison),
            o(cnt * hv * s, poison);
        if (cnt == 1) {
            const size_t smem = (C * 129 + 2 * 129 + 32 * 129 + 2 * C + C * 32 + 2 * 128 + 32 + 8 + 1) * 4;
            emu_launch({hv, (s + 31) / 32, 1}, 256, smem, [&] {
                delta_net_chunk_decode_f32(o.data(), m.data(), cu.data(), ck.data(), cf.data(),
                                           ce.data(), clen.data(), ticket.data(),
                                           conv_next.data(), mx, b, a, conv_w.data(),
                                           conv.data(), dt_bias.data(), ssm_a.data(), hk, hv, s,
                                           kc, 1e-6f);
            });
            conv = conv_next;
            o_all.insert(o_all.end(), o.begin(), o.end());
            t0 += cnt;
            continue;
        }
        emu_launch({cnt, 1, 1}, 256, (cd + 10 * hk) * 4, [&] {
            delta_net_prep_f32(prep.data(), gates.data(), mx, b, a, conv_w.data(), conv.data(),
                               dt_bias.data(), ssm_a.data(), hk, hv, s, kc, 1e-6f);
        });
        const u32 nseg = (cnt + C - 1) / C + 1;
        std::vector<float> ga(hv * nseg * C * C, poison), gb(ga), ge(hv * nseg * C, poison),
            gf(ge);
        std::vector<u32> info(1, 0xa5a5a5a5u);
        emu_launch({hv, nseg, 1}, 256, (2 * C * 129 + C * 65 + C) * 4, [&] {
            delta_net_chunk_gram_f32(ga.data(), gb.data(), ge.data(), gf.data(), info.data(),
                                     prep.data(), gates.data(), ck.data(), cf.data(), ce.data(),
                                     clen.data(), cnt, hk, hv, s);
        });
        const size_t scan_smem =
            (128 * 32 + 3 * 128 * C + 2 * C * C + 2 * C * 32 + 2 * 32 * 72 + 3 * C) * 4;
        emu_launch({hv, (s + 31) / 32, 1}, 256, scan_smem, [&] {
            delta_net_chunk_scan_f32(o.data(), m.data(), cu.data(), ga.data(), gb.data(),
                                     ge.data(), gf.data(), prep.data(), gates.data(), ck.data(),
                                     clen.data(), cnt, nseg, hk, hv, s);
        });
        emu_launch({hv, 1, 1}, 256, 0, [&] {
            delta_net_chunk_finish_f32(ck.data(), cf.data(), ce.data(), clen.data(),
                                       conv_next.data(), info.data(), ge.data(), gf.data(),
                                       prep.data(), mx, conv.data(), cnt, nseg, hk, hv, s, kc);
        });
        conv = conv_next;
        o_all.insert(o_all.end(), o.begin(), o.end());
        t0 += cnt;
    }
    conv.resize((size_t)(kc - 1) * cd);
    std::ofstream out(argv[2], std::ios::binary);
    for (const auto* v : {&o_all, &conv, &m, &ck, &cu, &cf, &ce}) write_vec(out, *v);
    out.write(reinterpret_cast<const char*>(clen.data()), 4);
    if (ticket[0] != 0) return 5;  // the last block resets it
    return out ? 0 : 4;
}
