// bitexact-logits: every token's logits from llama.cpp, for the agreement test
// (tests/agreement/main.rs) and the side-by-side harness.
//
//   bitexact-logits MODEL.gguf TOKENS OUT [--kv f32|f16] [--flash 0|1] [--gpu-layers N]
//                   [--threads N]
//
// TOKENS holds little-endian u32 token ids; all of them are decoded in one batch (one
// llama_decode call, positions 0..n, one sequence) and OUT receives n rows of n_vocab
// little-endian f32 logits, row i for token i. Defaults: f32 KV cache, flash attention off,
// CPU only: the configuration in which llama.cpp computes what bitexact's reference computes,
// up to float rounding. Exit status 0 on success, 1 on any failure (with a message on stderr).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int fail(const std::string & msg) {
    fprintf(stderr, "bitexact-logits: %s\n", msg.c_str());
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        return fail("usage: bitexact-logits MODEL.gguf TOKENS OUT [--kv f32|f16] [--flash 0|1] "
                    "[--gpu-layers N] [--threads N]");
    }
    const char * model_path = argv[1];
    const char * tokens_path = argv[2];
    const char * out_path = argv[3];
    ggml_type kv = GGML_TYPE_F32;
    bool flash = false;
    int gpu_layers = 0;
    int threads = 0;
    for (int i = 4; i + 1 < argc; i += 2) {
        const std::string k = argv[i], v = argv[i + 1];
        if (k == "--kv" && v == "f32") kv = GGML_TYPE_F32;
        else if (k == "--kv" && v == "f16") kv = GGML_TYPE_F16;
        else if (k == "--flash") flash = v == "1";
        else if (k == "--gpu-layers") gpu_layers = atoi(v.c_str());
        else if (k == "--threads") threads = atoi(v.c_str());
        else return fail("unknown option " + k + " " + v);
    }

    std::vector<llama_token> tokens;
    {
        FILE * f = fopen(tokens_path, "rb");
        if (!f) return fail(std::string("cannot open ") + tokens_path);
        uint32_t t;
        while (fread(&t, 4, 1, f) == 1) tokens.push_back((llama_token) t);
        fclose(f);
    }
    if (tokens.empty()) return fail("no tokens");
    const int n = (int) tokens.size();

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = gpu_layers;
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots on stdout
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) return fail(std::string("cannot load ") + model_path);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n;
    cp.n_batch = (uint32_t) n;
    cp.n_ubatch = (uint32_t) n;
    cp.type_k = kv;
    cp.type_v = kv;
    cp.flash_attn_type = flash ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    if (threads > 0) {
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return fail("cannot create a context");

    llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        b.token[i] = tokens[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) return fail("llama_decode failed");

    FILE * out = fopen(out_path, "wb");
    if (!out) return fail(std::string("cannot write ") + out_path);
    for (int i = 0; i < n; ++i) {
        const float * l = llama_get_logits_ith(ctx, i);
        if (!l || fwrite(l, sizeof(float), (size_t) n_vocab, out) != (size_t) n_vocab) {
            fclose(out);
            return fail("cannot write the logits");
        }
    }
    fclose(out);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
