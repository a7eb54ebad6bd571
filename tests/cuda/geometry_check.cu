// Checks the CUDA local kernels' tile geometry (csrc/local_attention/geometry.cuh) on the CPU,
// against the masks' definition (oasis_kernels/masks.py): for random grids, windows, tile shapes,
// block widths and head dims, every program's rows, the tokens each thread loads, the threads'
// visibility bits and the warps' frame skips together score every visible (query, key) pair
// exactly once and nothing else. Built and run by tests/test_cuda_local.py (nvcc, host code only).
//   nvcc -std=c++17 -O2 -I csrc/local_attention tests/cuda/geometry_check.cu -o geometry_check && ./geometry_check
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "geometry.cuh"

using namespace oasis_local;
using namespace oasis_local::detail;

namespace {

struct Config {
    int T, H, W, rt, rh, rw;
    bool window;
    TileShape shape;
};

bool visible(const Config& c, int q, int k) {
    const int HW = c.H * c.W;
    const int qt = q / HW, qh = q / c.W % c.H, qw = q % c.W;
    const int kt = k / HW, kh = k / c.W % c.H, kw = k % c.W;
    if (!c.window) return qt == kt;
    return std::abs(qt - kt) <= c.rt && std::abs(qh - kh) <= c.rh && std::abs(qw - kw) <= c.rw;
}

int failures = 0;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            if (++failures <= 10) {                             \
                std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
                std::printf(__VA_ARGS__);                       \
                std::printf("\n");                              \
            }                                                   \
            return;                                             \
        }                                                       \
    } while (0)

// one program (tile p) of one config: rows, loads, bits, skips against the definition
template <int D, int BLOCK_N>
void check_program(const Config& c, const Tile& tile, std::vector<int>& row_seen, long& pairs) {
    const int N = c.T * c.H * c.W;
    int rows[kRows];
    for (int r = 0; r < kRows; ++r) {
        rows[r] = tile.row_token(r);
        if (rows[r] >= 0) {
            CHECK(rows[r] < N, "row token %d of %d", rows[r], N);
            ++row_seen[rows[r]];
        }
    }
    using Rows = TileRows<D, BLOCK_N>;
    constexpr int kStride = kThreads / (D / 8);
    std::vector<Rows> threads;
    std::vector<RowTokens<1, kThreads, BLOCK_N>> float_threads;
    for (int x = 0; x < kThreads; ++x) {
        threads.emplace_back(x / (D / 8));
        float_threads.emplace_back(x);
    }
    std::vector<std::set<int>> seen(kRows);
    Block b = tile.first_block();
    for (int it = 0; it < tile.n_blocks; ++it, b = tile.next(b)) {
        CHECK(b.it == it, "block counter %d at step %d", b.it, it);
        // the tokens loaded into each row of the block's shared-memory tile, by the threads
        // that load them (only the threads of one chunk column write a row's token here)
        int col[BLOCK_N];
        int writes[BLOCK_N] = {};
        for (int x = 0; x < kThreads; ++x) {
            int tok[Rows::kRowsPerThread];
            threads[x].at(tile, b, tok);
            if (x % (D / 8) != 0) continue;  // the other chunks of the same rows: same tokens
            for (int i = 0; i < Rows::kRowsPerThread; ++i) {
                const int r = x / (D / 8) + i * kStride;
                CHECK(r < BLOCK_N, "row %d of a %d-row block", r, BLOCK_N);
                col[r] = tok[i];
                ++writes[r];
            }
        }
        for (int r = 0; r < BLOCK_N; ++r) {
            CHECK(writes[r] == 1, "block row %d written %d times", r, writes[r]);
            CHECK(col[r] < N, "column token %d of %d", col[r], N);
        }
        for (int x = 0; x < BLOCK_N; ++x) {  // the LSE / delta rows (thread x loads row x)
            int t[1];
            float_threads[x].at(tile, b, t);
            CHECK(t[0] == col[x], "float row %d: token %d, tile row %d", x, t[0], col[x]);
        }
        for (int warp = 0; warp < kWarps; ++warp) {
            if (!tile.warp_sees(b, warp)) continue;
            for (int lane = 0; lane < 32; ++lane) {
                const uint32_t bits = tile.masked<BLOCK_N>(b) ? tile.mask_bits<BLOCK_N>(b, lane) : ~0u;
                for (int n = 0; n < BLOCK_N / 8; ++n) {
                    for (int e = 0; e < 4; ++e) {
                        if (!((bits >> (4 * n + e)) & 1u)) continue;
                        const int r = warp * 16 + (lane >> 2) + 8 * (e >> 1);
                        const int k = col[8 * n + 2 * (lane & 3) + (e & 1)];
                        if (rows[r] < 0) continue;  // a padding row: never stored
                        CHECK(k >= 0, "a visible bit on a missing key (row %d)", r);
                        CHECK(visible(c, rows[r], k), "query %d scores key %d, which it does not see", rows[r], k);
                        CHECK(seen[r].insert(k).second, "query %d scores key %d twice", rows[r], k);
                        ++pairs;
                    }
                }
            }
        }
    }
    for (int r = 0; r < kRows; ++r) {
        if (rows[r] < 0) continue;
        int want = 0;
        for (int k = 0; k < N; ++k) want += visible(c, rows[r], k);
        CHECK(int(seen[r].size()) == want, "query %d scores %zu keys of its %d", rows[r], seen[r].size(), want);
    }
}

template <int D, int BLOCK_N>
long check_config(const Config& c) {
    const Layer L{1, c.T, c.H, c.W, D, c.rt, c.rh, c.rw, nullptr, 1, c.window ? 1 : 0, 1};
    const int N = c.T * c.H * c.W;
    std::vector<int> row_seen(N, 0);
    long pairs = 0;
    Tile tile;
    for (int p = 0; tile.init<BLOCK_N>(p, c.window, L, c.shape.bh, c.shape.bw); ++p)
        check_program<D, BLOCK_N>(c, tile, row_seen, pairs);
    for (int n = 0; n < N; ++n) {
        if (row_seen[n] != 1 && ++failures <= 10)
            std::printf("FAIL: token %d is a row of %d programs\n", n, row_seen[n]);
    }
    return pairs;
}

}  // namespace

int main(int argc, char** argv) {
    const int cases = argc > 1 ? std::atoi(argv[1]) : 300;
    std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1234);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    long pairs = 0;
    for (int i = 0; i < cases; ++i) {
        Config c;
        c.T = pick(1, 9);
        c.H = pick(1, 22);
        c.W = pick(1, 22);
        const int windows[] = {1, 3, 5, 7, 9, 13};
        c.rt = std::min(windows[pick(0, 5)] / 2, c.T - 1);
        c.rh = std::min(windows[pick(0, 5)] / 2, c.H - 1);
        c.rw = std::min(windows[pick(0, 5)] / 2, c.W - 1);
        c.window = pick(0, 3) != 0;
        c.shape = kTileShapes[pick(0, 4)];
        switch (pick(0, 2)) {  // the (D, BLOCK_N) pairs the launchers use
            case 0: pairs += check_config<128, 64>(c); break;
            case 1: pairs += check_config<128, 32>(c); break;
            default: pairs += check_config<64, 64>(c); break;
        }
        if (failures) {
            std::printf("in case %d: grid (%d,%d,%d) radii (%d,%d,%d) %s tile %dx%d\n", i, c.T, c.H, c.W, c.rt,
                        c.rh, c.rw, c.window ? "window" : "intra", c.shape.bh, c.shape.bw);
            return 1;
        }
    }
    std::printf("geometry ok: %d cases, %ld visible pairs scored once each\n", cases, pairs);
    return 0;
}
