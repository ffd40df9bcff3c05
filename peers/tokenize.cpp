// bitexact-tokenize: llama.cpp's tokenizer on many texts, the second witness of the agreement
// test (tests/agreement/main.rs) beside llama.cpp's own test vectors.
//
//   bitexact-tokenize MODEL.gguf TEXTS OUT [--add-special 0|1] [--parse-special 0|1]
//
// MODEL is loaded vocabulary only (a vocab-only file such as ggml-vocab-qwen2.gguf, or any
// model file). TEXTS holds records of a little-endian u32 byte count and that many bytes of
// UTF-8; OUT receives, per text in order, a little-endian u32 count and that many u32 ids.
// Defaults: add_special 1 and parse_special 1, as llama-tokenize tokenizes by default.
// Exit status 0 on success, 1 on any failure (with a message on stderr).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int fail(const std::string & msg) {
    fprintf(stderr, "bitexact-tokenize: %s\n", msg.c_str());
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        return fail("usage: bitexact-tokenize MODEL.gguf TEXTS OUT [--add-special 0|1] "
                    "[--parse-special 0|1]");
    }
    bool add_special = true, parse_special = true;
    for (int i = 4; i + 1 < argc; i += 2) {
        const std::string k = argv[i], v = argv[i + 1];
        if (k == "--add-special") add_special = v == "1";
        else if (k == "--parse-special") parse_special = v == "1";
        else return fail("unknown option " + k + " " + v);
    }
    std::vector<std::string> texts;
    {
        FILE * f = fopen(argv[2], "rb");
        if (!f) return fail(std::string("cannot open ") + argv[2]);
        uint32_t len;
        while (fread(&len, 4, 1, f) == 1) {
            std::string s(len, '\0');
            if (len > 0 && fread(&s[0], 1, len, f) != len) {
                fclose(f);
                return fail("truncated text record");
            }
            texts.push_back(std::move(s));
        }
        fclose(f);
    }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    mp.progress_callback = [](float, void *) { return true; };
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) return fail(std::string("cannot load ") + argv[1]);
    const llama_vocab * vocab = llama_model_get_vocab(model);

    FILE * out = fopen(argv[3], "wb");
    if (!out) return fail(std::string("cannot create ") + argv[3]);
    std::vector<llama_token> ids;
    for (const std::string & s : texts) {
        ids.resize(s.size() + 16);
        int32_t n = llama_tokenize(vocab, s.data(), (int32_t) s.size(), ids.data(),
                                   (int32_t) ids.size(), add_special, parse_special);
        if (n < 0) {
            if (n == INT32_MIN) return fail("tokenization overflow");
            ids.resize((size_t) -n);
            n = llama_tokenize(vocab, s.data(), (int32_t) s.size(), ids.data(),
                               (int32_t) ids.size(), add_special, parse_special);
            if (n < 0) return fail("tokenization failed");
        }
        const uint32_t count = (uint32_t) n;
        fwrite(&count, 4, 1, out);
        for (int32_t i = 0; i < n; i++) {
            const uint32_t id = (uint32_t) ids[i];
            fwrite(&id, 4, 1, out);
        }
    }
    if (fclose(out) != 0) return fail(std::string("writing ") + argv[3]);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
