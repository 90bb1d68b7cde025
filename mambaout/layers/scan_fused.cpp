// Mamba's selective scan, fused: one pass over the sequence per (batch, channel), the N states in registers.
//
// Built on first use by mambaout/layers/scan_fused.py (which documents the layout and the arguments) with the
// system's C++ compiler, for the machine it runs on (-march=native); loaded through ctypes, so no Python or
// PyTorch headers are needed. Every sequence is read through strides and, optionally, a table of positions per
// group (the order in which that group visits the tokens of a map): a cross-scan indexes one copy of its inputs
// instead of materialising one per direction.
//
// Forward, per position t (visiting token l = positions[g][t]):
//     dt = softplus(delta + bias),  h_n = exp(dt·A_n)·h_n + dt·u·B_n,  y = Σ_n C_n·h_n + D·u
// Backward keeps a checkpoint of the state every CHUNK positions (the forward pass is run again to get them), then
// walks the chunks from the last to the first: each chunk's states are recomputed from its checkpoint into a small
// buffer and the adjoint g_n = C_n·dy + exp(dt'·A_n)·g'_n runs back through them, taking every gradient as it
// passes. Memory per (batch, channel) is O(L/CHUNK·N + CHUNK·N); nothing of size L·N is stored.
//
// The exponential, softplus and log1p are written here (polynomials), so that the compiler vectorises the loops over
// the N states and over blocks of positions; an exponent too small for a normal result gives exactly 0 (x86 CPUs
// compute with denormals up to 100x slower), and the worker threads run with denormals flushed to zero.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define MO_HAVE_MXCSR 1
#endif

namespace {

constexpr int64_t CHUNK = 64;  // positions per backward checkpoint, and per block of Δ computed at once

struct ScanArgs {
    int64_t dtype;      // 0 float32, 1 float64
    int64_t backward;   // 0 forward, 1 backward
    int64_t batch, channels, groups, length, state;
    int64_t u_channels;  // channels of u: `channels`, or channels / groups (one u shared by every group)
    int64_t threads;
    int64_t splits;     // backward: each group's channels cut into this many parts, each with its own dB, dC
    int64_t softplus;
    // inputs
    const void* u; int64_t u_sb, u_sd, u_sl;
    const void* delta; int64_t delta_sb, delta_sd, delta_sl;
    const void* A;       // [channels, state] contiguous
    const void* B; int64_t B_sb, B_sg, B_sl;  // state stride 1
    const void* C; int64_t C_sb, C_sg, C_sl;
    const void* D;       // [channels] or null
    const void* bias;    // [channels] or null
    const int64_t* positions;  // [groups, length] or null (identity)
    const void* dy;      // backward: [batch, channels, length] contiguous
    // outputs, all contiguous and zero-filled where noted
    void* y;             // forward: [batch, channels, length]
    void* du;            // backward: [batch, channels, length] (per channel, also when u is shared)
    void* ddelta;        // [batch, channels, length]
    void* dA;            // [threads, channels, state], zero-filled
    void* dB;            // [splits, batch, groups, length, state], zero-filled
    void* dC;            // same
    void* dD;            // [threads, channels], zero-filled
    void* dbias;         // [threads, channels], zero-filled
};

template <typename T> struct Limits;
template <> struct Limits<float> {
    using Bits = int32_t;
    static constexpr int mantissa = 23, bias = 127, exp_terms = 7, log_terms = 9;
};
template <> struct Limits<double> {
    using Bits = int64_t;
    static constexpr int mantissa = 52, bias = 1023, exp_terms = 13, log_terms = 18;
};

constexpr double LOG2E = 1.4426950408889634;

// ln(2)^n / n!: the Taylor coefficients of 2^r
constexpr double exp2_coefficient(int n) { return n == 0 ? 1.0 : exp2_coefficient(n - 1) * 0.6931471805599453 / n; }

// 2^x: 0 where the result would not be a normal number, +inf past the largest; NaN stays NaN.
template <typename T>
inline T exp2_(T x) {
    using L = Limits<T>;
    const T lo = T(2 - L::bias), hi = T(L::bias);  // every result in [2^-125.5, 2^127.5] for float is normal
    const T xc = std::min(std::max(x, lo), hi);
    const T k = std::floor(xc + T(0.5));
    const T r = xc - k;  // exact, in [-1/2, 1/2]
    T p = T(exp2_coefficient(L::exp_terms));  // the Taylor series of 2^r, by Horner's rule
    for (int i = L::exp_terms - 1; i >= 0; --i) p = p * r + T(exp2_coefficient(i));
    const typename L::Bits e = (static_cast<typename L::Bits>(k) + L::bias) << L::mantissa;
    T scale;
    std::memcpy(&scale, &e, sizeof(T));
    T result = p * scale;
    result = x < lo ? T(0) : result;
    return x > hi ? std::numeric_limits<T>::infinity() : result;
}

template <typename T>
inline T exp_(T x) {
    return exp2_(x * T(LOG2E));
}

// The N states of one channel as one vector (GCC/Clang vector extensions: one AVX-512 register for 16 floats, two
// AVX2 ones, ...), so that the state stays in registers from one position to the next.
template <typename T, int NS>
struct Vec {
    typedef T V __attribute__((vector_size(NS * sizeof(T))));
    typedef typename Limits<T>::Bits I __attribute__((vector_size(NS * sizeof(T))));

    static V load(const T* p) {
        V v;
        std::memcpy(&v, p, sizeof(V));
        return v;
    }
    static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
    static V splat(T x) { return V{} + x; }

    // 2^x lane by lane, as exp2_ below: 0 where the result would not be normal, +inf past the largest, NaN kept
    static V exp2(V x) {
        using L = Limits<T>;
        const T lo = T(2 - L::bias), hi = T(L::bias);
        V xc = x < lo ? splat(lo) : x;
        xc = xc > hi ? splat(hi) : xc;
        const V shifter = splat(T(1.5) * T(typename L::Bits(1) << L::mantissa));
        const V k = (xc + shifter) - shifter;  // the nearest integer
        const V r = xc - k;                    // exact, in [-1/2, 1/2]
        V p = splat(T(exp2_coefficient(L::exp_terms)));
        for (int i = L::exp_terms - 1; i >= 0; --i) p = p * r + T(exp2_coefficient(i));
        const I e = (__builtin_convertvector(k, I) + L::bias) << L::mantissa;
        V result = p * reinterpret_cast<const V&>(e);
        result = x < lo ? V{} : result;
        return x > hi ? splat(std::numeric_limits<T>::infinity()) : result;
    }

    // Σ of the lanes, halves added as vectors
    template <typename W, size_t... J>
    static auto low(W v, std::index_sequence<J...>) {
        return __builtin_shufflevector(v, v, J...);
    }
    template <typename W, size_t... J>
    static auto high(W v, std::index_sequence<J...>) {
        return __builtin_shufflevector(v, v, (J + sizeof...(J))...);
    }
    template <int W, typename X>
    static T fold(X v) {
        if constexpr (W == 1) {
            return v[0];
        } else {
            const auto half = std::make_index_sequence<W / 2>();
            return fold<W / 2>(low(v, half) + high(v, half));
        }
    }
    static T sum(V v) { return fold<NS>(v); }
};

// log1p(z) for z in [0, 1]: 2·atanh(s) with s = z / (2 + z) in [0, 1/3], exact to the last bits also for tiny z.
template <typename T>
inline T log1p_unit_(T z) {
    const T s = z / (T(2) + z), s2 = s * s;
    T p = T(1) / T(2 * Limits<T>::log_terms + 1);
    for (int i = Limits<T>::log_terms - 1; i >= 0; --i) p = T(1) / T(2 * i + 1) + s2 * p;
    return T(2) * s * p;
}

// softplus as PyTorch's (threshold 20: the identity above it) and its derivative, the sigmoid.
template <typename T>
inline T softplus_(T x) {
    const T sp = std::max(x, T(0)) + log1p_unit_(exp_(-std::abs(x)));
    return x > T(20) ? x : sp;
}
template <typename T>
inline T sigmoid_(T x) {
    const T s = T(1) / (T(1) + exp_(-x));
    return x > T(20) ? T(1) : s;
}

template <typename T>
struct Scan {
    const ScanArgs& a;
    const T *u, *delta, *A, *B, *C, *D, *bias, *dy;
    int64_t per_group;

    explicit Scan(const ScanArgs& args)
        : a(args),
          u(static_cast<const T*>(args.u)),
          delta(static_cast<const T*>(args.delta)),
          A(static_cast<const T*>(args.A)),
          B(static_cast<const T*>(args.B)),
          C(static_cast<const T*>(args.C)),
          D(static_cast<const T*>(args.D)),
          bias(static_cast<const T*>(args.bias)),
          dy(static_cast<const T*>(args.dy)),
          per_group(args.channels / args.groups) {}

    int64_t position(int64_t g, int64_t t) const { return a.positions ? a.positions[g * a.length + t] : t; }
    const T* u_row(int64_t b, int64_t d) const { return u + b * a.u_sb + (d % a.u_channels) * a.u_sd; }

    // Δ (after bias and softplus), its derivative and u for positions [t0, t0 + n) of channel d.
    void block(int64_t b, int64_t d, int64_t g, int64_t t0, int64_t n, T* dt, T* slope, T* uu, int64_t* ls) const {
        const T* drow = delta + b * a.delta_sb + d * a.delta_sd;
        const T* urow = u_row(b, d);
        const T bd = bias ? bias[d] : T(0);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t l = position(g, t0 + i);
            ls[i] = l;
            dt[i] = drow[l * a.delta_sl] + bd;
            uu[i] = urow[l * a.u_sl];
        }
        if (a.softplus) {
            if (slope)
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) slope[i] = sigmoid_(dt[i]);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) dt[i] = softplus_(dt[i]);
        } else if (slope) {
            std::fill(slope, slope + n, T(1));
        }
    }

    template <int NS>
    void forward_channel(int64_t b, int64_t d) const {
        using X = Vec<T, NS>;
        using V = typename X::V;
        const int64_t g = d / per_group;
        const T Dd = D ? D[d] : T(0);
        T* yrow = static_cast<T*>(a.y) + (b * a.channels + d) * a.length;
        const T* Bg = B + b * a.B_sb + g * a.B_sg;
        const T* Cg = C + b * a.C_sb + g * a.C_sg;
        const V A2 = X::load(A + d * NS) * T(LOG2E);  // exp(Δ·A) = 2^(Δ·A·log2(e))
        V h{};
        std::vector<V> readout(CHUNK);  // C_t·h_t of the block, summed over the states after the block
        T dt[CHUNK], uu[CHUNK];
        int64_t ls[CHUNK];
        for (int64_t t0 = 0; t0 < a.length; t0 += CHUNK) {
            const int64_t n = std::min(CHUNK, a.length - t0);
            block(b, d, g, t0, n, dt, nullptr, uu, ls);
            for (int64_t i = 0; i < n; ++i) {
                if (i + 16 < n) {  // the rows a cross-scan visits out of order: fetched ahead
                    __builtin_prefetch(Bg + ls[i + 16] * a.B_sl);
                    __builtin_prefetch(Cg + ls[i + 16] * a.C_sl);
                }
                const T step = dt[i], x = step * uu[i];
                h = X::exp2(step * A2) * h + x * X::load(Bg + ls[i] * a.B_sl);
                readout[i] = X::load(Cg + ls[i] * a.C_sl) * h;
            }
            for (int64_t i = 0; i < n; ++i) yrow[ls[i]] = X::sum(readout[i]) + Dd * uu[i];
        }
    }

    // The backward of channel d of sample b, into split `split`'s dB, dC and worker w's sums.
    template <int NS>
    void backward_channel(int64_t b, int64_t d, int64_t split, int64_t w) const {
        using X = Vec<T, NS>;
        using V = typename X::V;
        const int64_t g = d / per_group, L = a.length;
        const int64_t chunks = (L + CHUNK - 1) / CHUNK;
        const T Dd = D ? D[d] : T(0);
        const T* Bg = B + b * a.B_sb + g * a.B_sg;
        const T* Cg = C + b * a.C_sb + g * a.C_sg;
        const int64_t grad_offset = ((split * a.batch + b) * a.groups + g) * L * NS;
        T* dBg = static_cast<T*>(a.dB) + grad_offset;
        T* dCg = static_cast<T*>(a.dC) + grad_offset;
        const int64_t row = (b * a.channels + d) * L;
        const T* dyrow = dy + row;
        T* durow = static_cast<T*>(a.du) + row;
        T* ddrow = static_cast<T*>(a.ddelta) + row;
        const V Ad = X::load(A + d * NS), A2 = Ad * T(LOG2E);

        std::vector<V> start(chunks), hs(CHUNK), as(CHUNK), input_grad(CHUNK), decay_grads(CHUNK);
        T dt[CHUNK], slope[CHUNK], uu[CHUNK];
        int64_t ls[CHUNK];
        V h{};
        for (int64_t k = 0; k < chunks; ++k) {  // the state entering every chunk
            const int64_t t0 = k * CHUNK, n = std::min(CHUNK, L - t0);
            start[k] = h;
            block(b, d, g, t0, n, dt, nullptr, uu, ls);
            for (int64_t i = 0; i < n; ++i)
                h = X::exp2(dt[i] * A2) * h + (dt[i] * uu[i]) * X::load(Bg + ls[i] * a.B_sl);
        }
        V p{}, dA_sum{};  // p: the adjoint handed back from the next position, a_{t+1}·g_{t+1}
        T dD_sum = T(0), dbias_sum = T(0);
        for (int64_t k = chunks - 1; k >= 0; --k) {
            const int64_t t0 = k * CHUNK, n = std::min(CHUNK, L - t0);
            block(b, d, g, t0, n, dt, slope, uu, ls);
            for (int64_t i = 0; i < n; ++i) {  // the chunk's states and decays again, kept
                as[i] = X::exp2(dt[i] * A2);
                hs[i] = as[i] * (i ? hs[i - 1] : start[k]) + (dt[i] * uu[i]) * X::load(Bg + ls[i] * a.B_sl);
            }
            for (int64_t i = n - 1; i >= 0; --i) {
                const int64_t l = ls[i];
                const T step = dt[i], x = step * uu[i], g_y = dyrow[l];
                const V Bt = X::load(Bg + l * a.B_sl);
                const V gs = X::load(Cg + l * a.C_sl) * g_y + p;  // the adjoint of h_t
                T* dCt = dCg + l * NS;
                T* dBt = dBg + l * NS;
                X::store(dCt, X::load(dCt) + g_y * hs[i]);
                X::store(dBt, X::load(dBt) + gs * x);
                const V decay_grad = gs * as[i] * (i ? hs[i - 1] : start[k]);  // the gradient of log a_t = Δ_t·A
                dA_sum += decay_grad * step;
                p = as[i] * gs;
                input_grad[i] = gs * Bt;       // Σ_n: the gradient of Δ_t·u_t
                decay_grads[i] = decay_grad * Ad;  // Σ_n: the gradient of Δ_t through the decays
            }
            for (int64_t i = 0; i < n; ++i) {  // the sums over the states, off the adjoint's chain
                const int64_t l = ls[i];
                const T gB = X::sum(input_grad[i]), g_y = dyrow[l];
                const T d_step = (X::sum(decay_grads[i]) + gB * uu[i]) * slope[i];
                durow[l] = gB * dt[i] + Dd * g_y;
                ddrow[l] = d_step;
                dbias_sum += d_step;
                dD_sum += g_y * uu[i];
            }
        }
        T* dA = static_cast<T*>(a.dA) + (w * a.channels + d) * NS;
        X::store(dA, X::load(dA) + dA_sum);
        static_cast<T*>(a.dD)[w * a.channels + d] += dD_sum;
        static_cast<T*>(a.dbias)[w * a.channels + d] += dbias_sum;
    }

    template <int NS>
    void run_items(int64_t w, int64_t first, int64_t last) const {
        for (int64_t item = first; item < last; ++item) {
            if (!a.backward) {
                forward_channel<NS>(item / a.channels, item % a.channels);
                continue;
            }
            // backward items are (sample, group, split): one writer per dB/dC slice
            const int64_t split = item % a.splits, bg = item / a.splits;
            const int64_t b = bg / a.groups, g = bg % a.groups;
            const int64_t lo = g * per_group + split * per_group / a.splits;
            const int64_t hi = g * per_group + (split + 1) * per_group / a.splits;
            for (int64_t d = lo; d < hi; ++d) backward_channel<NS>(b, d, split, w);
        }
    }

    void run_worker(int64_t w, int64_t items, int64_t workers) const {
#ifdef MO_HAVE_MXCSR
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);  // flush denormal results and inputs to zero
#endif
        const int64_t first = items * w / workers, last = items * (w + 1) / workers;
        switch (a.state) {  // the Python side pads every other state size to one of these
            case 4: run_items<4>(w, first, last); break;
            case 8: run_items<8>(w, first, last); break;
            case 16: run_items<16>(w, first, last); break;
            case 32: run_items<32>(w, first, last); break;
            default: run_items<64>(w, first, last); break;
        }
#ifdef MO_HAVE_MXCSR
        _mm_setcsr(csr);
#endif
    }

    // False when some share of the work could not allocate its buffers (the caller reports it).
    bool run() const {
        const int64_t items = a.backward ? a.batch * a.groups * a.splits : a.batch * a.channels;
        const int64_t workers = std::max<int64_t>(1, std::min(a.threads, items));
        std::atomic<bool> failed{false};
        auto share = [&](int64_t w) {
            try {
                run_worker(w, items, workers);
            } catch (...) {  // an exception must not leave a thread: it would end the process
                failed = true;
            }
        };
        std::vector<std::thread> pool;
        int64_t started = 1;
        try {
            for (; started < workers; ++started) pool.emplace_back(share, started);
        } catch (...) {  // no more threads to be had: the caller's thread takes the shares left
        }
        share(0);
        for (int64_t w = started; w < workers; ++w) share(w);
        for (auto& t : pool) t.join();
        return !failed;
    }
};

}  // namespace

extern "C" {

// The version of ScanArgs' layout: the Python side checks it before the first call.
int64_t mambaout_scan_abi() { return 1; }

int64_t mambaout_scan(const ScanArgs* args) {
    try {
        const bool done = args->dtype == 0 ? Scan<float>(*args).run() : Scan<double>(*args).run();
        return done ? 0 : 1;
    } catch (...) {  // nothing may cross the C boundary
        return 1;
    }
}
}
