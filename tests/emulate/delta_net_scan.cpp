// The recurrence's scans of cuda/delta_net.cu (v1: delta_net_scan_f32; v2, v3, v5, v6:
// delta_net_prep_f32 then delta_net_scan{2,3,5,6}_f32) under cuda_emu.h, in the geometry
// src/kernels/delta_net.rs launches them, then the window's copy; cp.async copies run as plain
// copies (rewritten by tests/parity/emulate.rs). Over a case written by the test:
//   in:  u32 version hk hv s kc n pieces, u32 piece[pieces], then f32 vectors (u32 length
//        first): conv_w dt_bias ssm_a mixed b a
//   out: f32 vectors o conv m
#include <cstdio>
#include <fstream>

#include "case_io.h"
#include "cuda_emu.h"
#include "family.h"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    CaseIn in(argv[1]);
    const u32 version = in.u(), hk = in.u(), hv = in.u(), s = in.u(), kc = in.u(), n = in.u(),
              np = in.u();
    std::vector<u32> pieces(np);
    for (auto& p : pieces) p = in.u();
    const auto conv_w = in.vec<float>(), dt_bias = in.vec<float>(), ssm_a = in.vec<float>(), mixed = in.vec<float>(), bg = in.vec<float>(),
               ag = in.vec<float>();
    if (!in.in || np == 0) return 3;
    const u32 cd = (2 * hk + hv) * s, rows = kc > 1 ? kc - 1 : 1;
    const float poison = __uint_as_float(0x7fa5a5a5u);
    std::vector<float> conv(rows * cd, 0.f), conv_next(rows * cd, 0.f), m(hv * s * s, 0.f);
    std::vector<float> o_all;
    for (u32 t0 = 0, i = 0; t0 < n; ++i) {
        const u32 cnt = std::min(pieces[i % np], n - t0);
        const float* mx = mixed.data() + (size_t)t0 * cd;
        const float* b = bg.data() + (size_t)t0 * hv;
        const float* a = ag.data() + (size_t)t0 * hv;
        std::vector<float> o(cnt * hv * s, poison);
        if (version == 1) {
            emu_launch({hv, 1, 1}, 4 * s, 0, [&] {
                delta_net_scan_f32(o.data(), m.data(), conv_next.data(), mx, b, a, conv_w.data(),
                                   conv.data(), dt_bias.data(), ssm_a.data(), cnt, hk, hv, s, kc,
                                   1e-6f);
            });
        } else {
            std::vector<float> prep(cnt * cd, poison), gates(cnt * hv * 2, poison);
            emu_launch({cnt, 1, 1}, 256, (cd + 10 * hk) * 4, [&] {
                delta_net_prep_f32(prep.data(), gates.data(), mx, b, a, conv_w.data(),
                                   conv.data(), dt_bias.data(), ssm_a.data(), hk, hv, s, kc,
                                   1e-6f);
            });
            auto scan = [&] {
                float *op = o.data(), *mp = m.data(), *cn = conv_next.data();
                const float *pp = prep.data(), *gp = gates.data(), *cv = conv.data();
                switch (version) {
                case 2: delta_net_scan2_f32(op, mp, cn, pp, gp, mx, cv, cnt, hk, hv, s, kc); break;
                case 3: delta_net_scan3_f32(op, mp, cn, pp, gp, mx, cv, cnt, hk, hv, s, kc); break;
                case 5: delta_net_scan5_f32(op, mp, cn, pp, gp, mx, cv, cnt, hk, hv, s, kc); break;
                default: delta_net_scan6_f32(op, mp, cn, pp, gp, mx, cv, cnt, hk, hv, s, kc); break;
                }
            };
            if (version == 2)
                emu_launch({hv, 1, 1}, 4 * s, 0, scan);
            else
                emu_launch({hv, (s + 31) / 32, 1}, 128, 0, scan);
        }
        conv = conv_next;
        o_all.insert(o_all.end(), o.begin(), o.end());
        t0 += cnt;
    }
    conv.resize((size_t)(kc - 1) * cd);
    std::ofstream out(argv[2], std::ios::binary);
    for (const auto* v : {&o_all, &conv, &m}) write_vec(out, *v);
    return out ? 0 : 4;
}
