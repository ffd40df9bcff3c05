// case_io.h — the drivers' case files (written and read back by tests/parity/emulate.rs): u32
// scalars, and vectors as a u32 length then the elements, little-endian.
#pragma once
#include <fstream>
#include <vector>

struct CaseIn {
    std::ifstream in;
    explicit CaseIn(const char* path) : in(path, std::ios::binary) {}
    unsigned u() {
        unsigned v = 0;
        in.read(reinterpret_cast<char*>(&v), 4);
        return v;
    }
    template <class T> std::vector<T> vec() {
        std::vector<T> v(u());
        in.read(reinterpret_cast<char*>(v.data()), sizeof(T) * v.size());
        return v;
    }
};

template <class T> void write_vec(std::ofstream& out, const std::vector<T>& v) {
    const unsigned len = v.size();
    out.write(reinterpret_cast<const char*>(&len), 4);
    out.write(reinterpret_cast<const char*>(v.data()), sizeof(T) * v.size());
}
