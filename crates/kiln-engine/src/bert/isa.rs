//! The instruction-set variants the encoder's arithmetic is compiled for, and
//! the one piece of it written with intrinsics: the matrix-product tile.
//!
//! Everything else (GELU, LayerNorm, softmax, the loops around the tile) is
//! portable Rust, generic over an [`Arith`] marker and `#[inline(always)]`,
//! and [`multiversion!`] compiles it once per variant inside a
//! `#[target_feature]` function, so LLVM vectorises it with that variant's
//! registers. The variant is picked once, at load, from
//! [`KernelVariant`] (which honours `KILN_KERNELS`).
//!
//! - [`Avx512`] and [`Avx2`] compute matrix products with their own tiles
//!   ([`Tiled`]): each output sums its products in `k` order, one fused
//!   multiply-add per product, starting from the bias, so the two give the
//!   same bits.
//! - [`Portable`] (any other CPU, aarch64 included) hands matrix products to
//!   the `gemm` crate, which picks NEON, FMA or scalar code at run time; its
//!   summation order differs, so its vectors match the SIMD variants' to
//!   float rounding, not bit for bit. Its element-wise math fuses
//!   multiply-adds where the build target has FMA in hardware and multiplies
//!   and adds separately otherwise (x86 without FMA, where `mul_add` would be
//!   a slow library call).
//!
//! Invariant: [`Isa::Avx2`] and [`Isa::Avx512`] exist only after run-time
//! detection found the features their code is compiled with; that is what
//! makes the `unsafe` calls into `#[target_feature]` code sound.

use crate::bert::matmul::{gemm_crate_product, tiled_product, PackedMatrix};
use crate::kernels::KernelVariant;

/// Width of a packed weight panel: the tile computes this many output columns.
pub(super) const NR: usize = 32;

/// The instruction set the encoder's kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// Portable Rust, auto-vectorised for the build's baseline target;
    /// matrix products by the `gemm` crate.
    Portable,
    /// AVX2 + FMA (256-bit).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (512-bit, masked stores) + AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The variant for `requested`, or `None` when this CPU lacks its features.
    pub(super) fn new(requested: KernelVariant) -> Option<Isa> {
        match requested {
            KernelVariant::Scalar => Some(Isa::Portable),
            #[cfg(target_arch = "x86_64")]
            KernelVariant::Avx2 => has_avx2().then_some(Isa::Avx2),
            #[cfg(target_arch = "x86_64")]
            KernelVariant::Avx512 => (has_avx2() && has_avx512()).then_some(Isa::Avx512),
            #[cfg(not(target_arch = "x86_64"))]
            KernelVariant::Avx2 | KernelVariant::Avx512 => None,
        }
    }

    /// Every variant this CPU runs, for tests that force each one.
    #[cfg(test)]
    pub(super) fn all_available() -> Vec<Isa> {
        KernelVariant::ALL
            .into_iter()
            .filter_map(Isa::new)
            .collect()
    }

    /// Rows per tile: as many as the variant's registers hold accumulators
    /// for (the portable variant's is the `gemm` crate's, about 8).
    pub(super) fn tile_rows(self) -> usize {
        match self {
            Isa::Portable => 8,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::MR,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::MR,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// The arithmetic of one variant. All methods are `#[inline(always)]`: they
/// take on the target features of the [`multiversion!`] wrapper they are
/// inlined into.
pub(super) trait Arith {
    /// `a * b + c`, fused unless the variant says otherwise.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// `c[r * ldc + col] = A·B + bias` for rows `r < m` of `a` (row stride
    /// `lda`) and the columns of panels `p0..p1` of `b`, written from column 0
    /// of `c`; then GELU when `gelu`. Panels past the last are ignored.
    #[allow(clippy::too_many_arguments)]
    fn product(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &PackedMatrix,
        p0: usize,
        p1: usize,
        c: &mut [f32],
        ldc: usize,
        gelu: bool,
    );
}

/// A variant with its own matrix-product tile, driven by [`tiled_product`].
pub(super) trait Tiled: Arith {
    /// Most rows one [`Tiled::tile`] computes.
    const MR: usize;

    /// `c[r * ldc + j] = bias[j] + Σ_kk a[r * lda + kk] * panel[kk * NR + j]`
    /// for `r < rows ≤ MR`, `j < cols ≤ NR`, summed in `kk` order from the
    /// bias. `panel` holds `k` rows of `NR` weights.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        rows: usize,
        a: &[f32],
        lda: usize,
        panel: &[f32],
        k: usize,
        bias: &[f32; NR],
        c: &mut [f32],
        ldc: usize,
        cols: usize,
    );
}

/// Calls `$f::<R>($args)` with `R` the const generic equal to `$rows`
/// (1 to 12; more is a caller bug and computes nothing).
macro_rules! with_rows {
    ($rows:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            _ => {}
        }
    };
}

/// Defines `$vis fn $name(isa: Isa, args...)`, which runs the generic
/// `$generic::<A: Arith>(args...)` compiled for `isa`'s target features.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?);) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::bert::isa::Isa, $($arg: $ty),*) {
            match isa {
                $crate::bert::isa::Isa::Portable => {
                    $generic::<$crate::bert::isa::Portable>($($arg),*)
                }
                #[cfg(target_arch = "x86_64")]
                $crate::bert::isa::Isa::Avx2 => {
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) {
                        $generic::<$crate::bert::isa::Avx2>($($arg),*)
                    }
                    // SAFETY: `Isa::Avx2` is only built once the CPU is known
                    // to have AVX2 and FMA (`Isa::new`).
                    unsafe { avx2($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::bert::isa::Isa::Avx512 => {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn avx512($($arg: $ty),*) {
                        $generic::<$crate::bert::isa::Avx512>($($arg),*)
                    }
                    // SAFETY: `Isa::Avx512` is only built once the CPU is
                    // known to have AVX-512F, AVX2 and FMA (`Isa::new`).
                    unsafe { avx512($($arg),*) }
                }
            }
        }
    };
}
pub(super) use multiversion;

/// The `R` rows of a tile's `A`: `a` cut to `(R - 1) * lda + k` values, so
/// that every [`row_value`] index is in bounds.
#[inline(always)]
fn tile_rows<const R: usize>(a: &[f32], lda: usize, k: usize) -> &[f32] {
    &a[..(R - 1) * lda + k]
}

/// `a[r * lda + kk]` without a bounds check: the innermost read of every
/// tile (checking `R` row slices per step cost registers and branches in the
/// hot loop).
///
/// # Safety
/// `r * lda + kk < a.len()`, as holds for `r < R`, `kk < k` and `a` from
/// [`tile_rows::<R>`](tile_rows): `r * lda + kk ≤ (R - 1) * lda + k - 1`.
#[inline(always)]
unsafe fn row_value(a: &[f32], lda: usize, r: usize, kk: usize) -> f32 {
    // SAFETY: in bounds by the caller's contract, so nothing wraps either
    // (the wrapping ops only spare overflow-checked builds their checks).
    unsafe { *a.get_unchecked(r.wrapping_mul(lda).wrapping_add(kk)) }
}

/// Portable Rust, with matrix products by the `gemm` crate (see the module
/// docs).
pub(super) struct Portable;

pub(super) const PORTABLE_FUSED: bool =
    cfg!(target_feature = "fma") || !cfg!(any(target_arch = "x86", target_arch = "x86_64"));

impl Arith for Portable {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        if PORTABLE_FUSED {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    #[inline(always)]
    fn product(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &PackedMatrix,
        p0: usize,
        p1: usize,
        c: &mut [f32],
        ldc: usize,
        gelu: bool,
    ) {
        gemm_crate_product(a, lda, m, b, p0, p1, c, ldc, gelu);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{row_value, tile_rows, tiled_product, Arith, PackedMatrix, Tiled, NR};

    /// AVX2 + FMA: a tile is up to 6 rows × 16 columns of 8-lane
    /// accumulators (12 registers), done twice per 32-column panel.
    pub(in crate::bert) struct Avx2;

    impl Arith for Avx2 {
        #[inline(always)]
        fn mul_add(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }

        #[inline(always)]
        fn product(
            a: &[f32],
            lda: usize,
            m: usize,
            b: &PackedMatrix,
            p0: usize,
            p1: usize,
            c: &mut [f32],
            ldc: usize,
            gelu: bool,
        ) {
            tiled_product::<Self>(a, lda, m, b, p0, p1, c, ldc, gelu);
        }
    }

    impl Tiled for Avx2 {
        const MR: usize = 6;

        #[inline(always)]
        fn tile(
            rows: usize,
            a: &[f32],
            lda: usize,
            panel: &[f32],
            k: usize,
            bias: &[f32; NR],
            c: &mut [f32],
            ldc: usize,
            cols: usize,
        ) {
            // SAFETY: `Avx2` is only used inside `multiversion!`'s AVX2
            // wrapper, reached once the CPU was found to have AVX2 and FMA.
            unsafe { with_rows!(rows, avx2_tile(a, lda, panel, k, bias, c, ldc, cols)) }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load8(s: &[f32]) -> __m256 {
        let s = &s[..8];
        // SAFETY: `s` is 8 readable floats; the load needs no alignment.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store8(s: &mut [f32], v: __m256) {
        let s = &mut s[..8];
        // SAFETY: `s` is 8 writable floats; the store needs no alignment.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn avx2_tile<const R: usize>(
        a: &[f32],
        lda: usize,
        panel: &[f32],
        k: usize,
        bias: &[f32; NR],
        c: &mut [f32],
        ldc: usize,
        cols: usize,
    ) {
        let (a, panel) = (tile_rows::<R>(a, lda, k), &panel[..k * NR]);
        for half in 0..NR / 16 {
            let lo = 16 * half;
            if lo >= cols {
                break;
            }
            let b0 = load8(&bias[lo..]);
            let b1 = load8(&bias[lo + 8..]);
            let mut acc = [[b0, b1]; R];
            for (kk, w) in (0..k).zip(panel.chunks_exact(NR)) {
                let w0 = load8(&w[lo..]);
                let w1 = load8(&w[lo + 8..]);
                for (r, [v0, v1]) in acc.iter_mut().enumerate() {
                    // SAFETY: r < R, kk < k and `a` is from `tile_rows::<R>`.
                    let x = _mm256_set1_ps(unsafe { row_value(a, lda, r, kk) });
                    *v0 = _mm256_fmadd_ps(x, w0, *v0);
                    *v1 = _mm256_fmadd_ps(x, w1, *v1);
                }
            }
            let width = (cols - lo).min(16);
            for (r, [v0, v1]) in acc.into_iter().enumerate() {
                let out = &mut c[r * ldc + lo..r * ldc + lo + width];
                if width == 16 {
                    store8(out, v0);
                    store8(&mut out[8..], v1);
                } else {
                    let mut tmp = [0f32; 16];
                    store8(&mut tmp, v0);
                    store8(&mut tmp[8..], v1);
                    out.copy_from_slice(&tmp[..width]);
                }
            }
        }
    }

    /// AVX-512F: a tile is up to 12 rows × 32 columns of 16-lane
    /// accumulators (24 of the 32 registers).
    pub(in crate::bert) struct Avx512;

    impl Arith for Avx512 {
        #[inline(always)]
        fn mul_add(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }

        #[inline(always)]
        fn product(
            a: &[f32],
            lda: usize,
            m: usize,
            b: &PackedMatrix,
            p0: usize,
            p1: usize,
            c: &mut [f32],
            ldc: usize,
            gelu: bool,
        ) {
            tiled_product::<Self>(a, lda, m, b, p0, p1, c, ldc, gelu);
        }
    }

    impl Tiled for Avx512 {
        const MR: usize = 12;

        #[inline(always)]
        fn tile(
            rows: usize,
            a: &[f32],
            lda: usize,
            panel: &[f32],
            k: usize,
            bias: &[f32; NR],
            c: &mut [f32],
            ldc: usize,
            cols: usize,
        ) {
            // SAFETY: `Avx512` is only used inside `multiversion!`'s AVX-512
            // wrapper, reached once the CPU was found to have AVX-512F.
            unsafe { with_rows!(rows, avx512_tile(a, lda, panel, k, bias, c, ldc, cols)) }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(s: &[f32]) -> __m512 {
        let s = &s[..16];
        // SAFETY: `s` is 16 readable floats; the load needs no alignment.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }

    /// Stores the first `s.len()` (at most 16) lanes of `v` into `s`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store_first(s: &mut [f32], v: __m512) {
        let n = s.len().min(16);
        let mask = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
        // SAFETY: the mask selects lanes 0..n, and `s` has n writable floats;
        // masked-off lanes are not accessed.
        unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), mask, v) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn avx512_tile<const R: usize>(
        a: &[f32],
        lda: usize,
        panel: &[f32],
        k: usize,
        bias: &[f32; NR],
        c: &mut [f32],
        ldc: usize,
        cols: usize,
    ) {
        let (a, panel) = (tile_rows::<R>(a, lda, k), &panel[..k * NR]);
        let b0 = load16(bias);
        let b1 = load16(&bias[16..]);
        let mut acc = [[b0, b1]; R];
        for (kk, w) in (0..k).zip(panel.chunks_exact(NR)) {
            let w0 = load16(w);
            let w1 = load16(&w[16..]);
            for (r, [v0, v1]) in acc.iter_mut().enumerate() {
                // SAFETY: r < R, kk < k and `a` is from `tile_rows::<R>`.
                let x = _mm512_set1_ps(unsafe { row_value(a, lda, r, kk) });
                *v0 = _mm512_fmadd_ps(x, w0, *v0);
                *v1 = _mm512_fmadd_ps(x, w1, *v1);
            }
        }
        let cols = cols.min(NR);
        for (r, [v0, v1]) in acc.into_iter().enumerate() {
            let out = &mut c[r * ldc..r * ldc + cols];
            let (first, second) = out.split_at_mut(cols.min(16));
            store_first(first, v0);
            if !second.is_empty() {
                store_first(second, v1);
            }
        }
    }
}
