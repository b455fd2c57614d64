//! Every bad argument is refused before anything runs, with its own `Error` variant and a message naming
//! the argument; zero-size problems are legal; and no input, however odd, makes a call panic.

use flash_attn::problem::Problem;
use flash_attn::validate::validate_fwd;
use flash_attn::{check_varlen_contents, fwd, varlen_fwd, varlen_fwd_with, AttnOptions, Extras, DType, Device, Error, FwdOutput, Result, Tensor, Varlen};
use proptest::prelude::*;

fn t(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, Device::Cpu).unwrap()
}

fn i32s(x: &[i32]) -> Tensor {
    Tensor::from_i32(x.to_vec(), &[x.len()]).unwrap()
}

/// Asserts `r` failed with an error `is` accepts, whose message mentions `name`.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T>, is: impl Fn(&Error) -> bool, name: &str) {
    let e = r.expect_err("call must fail");
    assert!(is(&e), "unexpected error variant: {e:?}");
    assert!(e.to_string().contains(name), "message {:?} does not name {name:?}", e.to_string());
}

fn dense(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<FwdOutput> {
    fwd(q, k, v, &AttnOptions::default())
}

fn dense_with(opts: AttnOptions) -> Result<FwdOutput> {
    let q = t(&[1, 4, 2, 64], DType::BF16);
    fwd(&q, &q, &q, &opts)
}

/// Varlen call on q `[tq, 2, 64]`, k/v `[tk, 2, 64]` (bf16) with the given lengths.
struct V {
    tq: usize,
    tk: usize,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: usize,
    max_k: usize,
    used_q: Option<Tensor>,
    used_k: Option<Tensor>,
}

impl V {
    /// Two sequences: q lengths 3 and 2 (5 rows), k lengths 4 and 4 (8 rows).
    fn ok() -> V {
        V { tq: 5, tk: 8, cu_q: i32s(&[0, 3, 5]), cu_k: i32s(&[0, 4, 8]), max_q: 3, max_k: 4, used_q: None, used_k: None }
    }
    fn varlen(&self) -> Varlen<'_> {
        Varlen {
            cu_seqlens_q: &self.cu_q,
            cu_seqlens_k: &self.cu_k,
            max_seqlen_q: Some(self.max_q),
            max_seqlen_k: Some(self.max_k),
            seqused_q: self.used_q.as_ref(),
            seqused_k: self.used_k.as_ref(),
        }
    }
    fn run(&self) -> Result<FwdOutput> {
        let q = t(&[self.tq, 2, 64], DType::BF16);
        let k = t(&[self.tk, 2, 64], DType::BF16);
        varlen_fwd(&q, &k, &k, &self.varlen(), &AttnOptions::default())
    }
}

#[test]
fn dtypes() {
    let ok = t(&[1, 4, 2, 64], DType::F16);
    for bad in [DType::F32, DType::I32] {
        let q = t(&[1, 4, 2, 64], bad);
        expect_err(dense(&q, &q, &q), |e| matches!(e, Error::DType { arg: "q", .. }), "q");
    }
    let k = t(&[1, 4, 2, 64], DType::BF16);
    expect_err(dense(&ok, &k, &ok), |e| matches!(e, Error::DTypeMismatch { arg: "k", .. }), "k");
    expect_err(dense(&ok, &ok, &k), |e| matches!(e, Error::DTypeMismatch { arg: "v", .. }), "v");
}

#[test]
fn ranks_and_shapes() {
    let q = t(&[1, 4, 2, 64], DType::BF16);
    let r3 = t(&[4, 2, 64], DType::BF16);
    expect_err(dense(&r3, &q, &q), |e| matches!(e, Error::Rank { arg: "q", got: 3, expected: 4 }), "q");
    expect_err(dense(&q, &r3, &q), |e| matches!(e, Error::Rank { arg: "k", .. }), "k");
    let v = V::ok();
    expect_err(varlen_fwd(&q, &q, &q, &v.varlen(), &AttnOptions::default()), |e| matches!(e, Error::Rank { arg: "q", got: 4, expected: 3 }), "q");

    let k5 = t(&[1, 5, 2, 64], DType::BF16);
    expect_err(dense(&q, &q, &k5), |e| matches!(e, Error::Shape { arg: "v", .. }), "v");
    let kb = t(&[2, 4, 2, 64], DType::BF16);
    expect_err(dense(&q, &kb, &kb), |e| matches!(e, Error::Shape { arg: "k", .. }), "k");
    let kd = t(&[1, 4, 2, 128], DType::BF16);
    expect_err(dense(&q, &kd, &kd), |e| matches!(e, Error::Shape { arg: "k", .. }), "k");
}

#[test]
fn head_dims_and_heads() {
    for d in [0, 16, 48, 80, 512] {
        let q = t(&[1, 4, 2, d], DType::BF16);
        expect_err(dense(&q, &q, &q), |e| matches!(e, Error::HeadDim { got } if *got == d), "head dim");
    }
    for &d in &flash_attn::HEAD_DIMS {
        let q = t(&[1, 4, 2, d], DType::BF16);
        assert!(dense(&q, &q, &q).is_ok(), "head dim {d}");
    }
    let q = t(&[1, 4, 3, 64], DType::BF16);
    let k = t(&[1, 4, 2, 64], DType::BF16);
    expect_err(dense(&q, &k, &k), |e| matches!(e, Error::Heads { hq: 3, hk: 2 }), "num_heads");
    let k0 = t(&[1, 4, 0, 64], DType::BF16);
    expect_err(dense(&q, &k0, &k0), |e| matches!(e, Error::Heads { hk: 0, .. }), "num_heads_k (k/v): must be at least 1");
}

#[test]
fn last_dim_must_be_contiguous() {
    let base = t(&[1, 4, 2, 128], DType::BF16);
    let q = t(&[1, 4, 2, 64], DType::BF16);
    let strided = base.as_strided(&[1, 4, 2, 64], &[1024, 256, 128, 2], 0).unwrap();
    expect_err(dense(&q, &q, &strided), |e| matches!(e, Error::NotContiguous { arg: "v" }), "v");
    expect_err(dense(&strided, &q, &q), |e| matches!(e, Error::NotContiguous { arg: "q" }), "q");
    // Strided rows and heads are fine.
    let rows = base.as_strided(&[1, 4, 2, 64], &[1024, 256, 128, 1], 3).unwrap();
    assert!(dense(&rows, &q, &q).is_ok());
}

#[test]
fn options() {
    for softcap in [-1.0, -0.0001, f32::NAN, f32::INFINITY] {
        expect_err(dense_with(AttnOptions { softcap, ..Default::default() }), |e| matches!(e, Error::Value { arg: "softcap", .. }), "softcap");
    }
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        expect_err(dense_with(AttnOptions { softmax_scale: Some(s), ..Default::default() }), |e| matches!(e, Error::Value { arg: "softmax_scale", .. }), "softmax_scale");
    }
    for window in [(-2, -1), (-1, -2), (5, -7), (i64::MIN, 0)] {
        expect_err(dense_with(AttnOptions { window, ..Default::default() }), |e| matches!(e, Error::Value { arg: "window", .. }), "window");
    }
    for window in [(-1, -1), (0, 0), (3, -1), (i64::MAX, i64::MAX)] {
        assert!(dense_with(AttnOptions { window, causal: true, softcap: 5.0, softmax_scale: Some(-0.5), ..Default::default() }).is_ok(), "{window:?}");
    }
}

#[test]
fn cu_seqlens() {
    let mut v = V::ok();
    assert!(v.run().is_ok());
    v.cu_q = Tensor::from_f32(&[0.0, 3.0, 5.0], &[3], DType::F32).unwrap();
    expect_err(v.run(), |e| matches!(e, Error::DType { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");
    let mut v = V::ok();
    v.cu_k = Tensor::from_f32(&[0.0, 4.0, 8.0], &[3], DType::BF16).unwrap();
    expect_err(v.run(), |e| matches!(e, Error::DType { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    let mut v = V::ok();
    v.cu_q = Tensor::from_i32(vec![0, 3, 5, 5], &[2, 2]).unwrap();
    expect_err(v.run(), |e| matches!(e, Error::Rank { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");
    let mut v = V::ok();
    v.cu_k = i32s(&[0, 8]);
    expect_err(v.run(), |e| matches!(e, Error::Shape { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    let mut v = V::ok();
    (v.cu_q, v.cu_k) = (i32s(&[]), i32s(&[]));
    expect_err(v.run(), |e| matches!(e, Error::Shape { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");

    let mut v = V::ok();
    v.cu_q = i32s(&[1, 3, 5]);
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");
    let mut v = V::ok();
    v.cu_k = i32s(&[0, 5, 4]);
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    let mut v = V::ok();
    v.cu_q = i32s(&[0, 3, 6]);
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");
    let mut v = V::ok();
    v.cu_k = i32s(&[0, 4, 9]);
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    // Fewer rows than q has is fine: the tail is padding.
    let mut v = V::ok();
    (v.cu_q, v.cu_k) = (i32s(&[0, 1, 2]), i32s(&[0, 4, 4]));
    assert!(v.run().is_ok());
}

#[test]
fn max_seqlen_and_seqused() {
    let mut v = V::ok();
    v.max_q = 2;
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "max_seqlen_q", .. }), "max_seqlen_q");
    let mut v = V::ok();
    v.max_k = 3;
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "max_seqlen_k", .. }), "max_seqlen_k");
    // With seqused the real lengths are the used ones.
    let mut v = V::ok();
    (v.used_q, v.used_k, v.max_q, v.max_k) = (Some(i32s(&[2, 2])), Some(i32s(&[1, 3])), 2, 3);
    assert!(v.run().is_ok());
    v.max_k = 2;
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "max_seqlen_k", .. }), "max_seqlen_k");

    let mut v = V::ok();
    v.used_k = Some(i32s(&[5, 0]));
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "seqused_k", .. }), "seqused_k");
    let mut v = V::ok();
    v.used_q = Some(i32s(&[-1, 0]));
    expect_err(v.run(), |e| matches!(e, Error::SeqLens { arg: "seqused_q", .. }), "seqused_q");
    let mut v = V::ok();
    v.used_q = Some(i32s(&[1, 1, 1]));
    expect_err(v.run(), |e| matches!(e, Error::Shape { arg: "seqused_q", .. }), "seqused_q");
    let mut v = V::ok();
    v.used_k = Some(Tensor::from_f32(&[1.0, 1.0], &[2], DType::F16).unwrap());
    expect_err(v.run(), |e| matches!(e, Error::DType { arg: "seqused_k", .. }), "seqused_k");
}

#[test]
fn max_seqlen_may_be_absent() {
    // Not given, the max lengths bound nothing: the call runs, bitwise as with them, and its lengths are
    // still checked (on the CPU, where they are host memory).
    let v = V::ok();
    let (q, k) = (t(&[v.tq, 2, 64], DType::BF16), t(&[v.tk, 2, 64], DType::BF16));
    let opts = AttnOptions::default();
    let given = varlen_fwd(&q, &k, &k, &v.varlen(), &opts).unwrap();
    for (max_q, max_k) in [(None, None), (Some(3), None), (None, Some(4))] {
        let vl = Varlen { max_seqlen_q: max_q, max_seqlen_k: max_k, ..v.varlen() };
        let o = varlen_fwd(&q, &k, &k, &vl, &opts).unwrap();
        assert_eq!((o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap()), (given.out.to_f32_vec().unwrap(), given.lse.to_f32_vec().unwrap()));
        // s_dmask's shape is [B, H, max_seqlen_q, max_seqlen_k]: both are required for it.
        let probs = Extras { return_attn_probs: true, ..Default::default() };
        expect_err(varlen_fwd_with(&q, &k, &k, &vl, &probs, &opts), |e| matches!(e, Error::Value { arg: "max_seqlen_q", .. }), "max_seqlen_q");
    }
    let mut v = V::ok();
    v.used_k = Some(i32s(&[5, 0]));
    let vl = Varlen { max_seqlen_q: None, max_seqlen_k: None, ..v.varlen() };
    expect_err(varlen_fwd(&q, &k, &k, &vl, &opts), |e| matches!(e, Error::SeqLens { arg: "seqused_k", .. }), "seqused_k");
}

#[test]
fn check_varlen_contents_on_request() {
    let v = V::ok();
    let s = check_varlen_contents(&v.varlen(), 5, 8).unwrap();
    assert_eq!((s.cu_seqlens_q, s.cu_seqlens_k), (vec![0, 3, 5], vec![0, 4, 8]));
    expect_err(check_varlen_contents(&v.varlen(), 4, 8), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_q", .. }), "cu_seqlens_q");
}

#[test]
fn too_large() {
    // A stride-0 view claims 2^31 rows of one stored row: more than i32 row indices reach.
    let row = t(&[64], DType::BF16);
    let q = row.as_strided(&[1, 1 << 31, 1, 64], &[0, 0, 0, 1], 0).unwrap();
    let k = t(&[1, 4, 1, 64], DType::BF16);
    expect_err(dense(&q, &k, &k), |e| matches!(e, Error::TooLarge { arg: "q", .. }), "q");
    let q = row.as_strided(&[1 << 16, 1 << 16, 1, 64], &[0, 0, 0, 1], 0).unwrap();
    let k = row.as_strided(&[1 << 16, 4, 1, 64], &[0, 0, 0, 1], 0).unwrap();
    expect_err(dense(&q, &k, &k), |e| matches!(e, Error::TooLarge { arg: "q", .. }), "q");
    let mut v = V::ok();
    v.max_q = 1 << 40;
    expect_err(v.run(), |e| matches!(e, Error::TooLarge { arg: "max_seqlen_q", .. }), "max_seqlen_q");
}

#[test]
fn zero_sizes_are_legal() {
    for (b, sq, sk) in [(0, 4, 4), (2, 0, 4), (2, 4, 0), (0, 0, 0)] {
        let q = t(&[b, sq, 2, 32], DType::F16);
        let k = t(&[b, sk, 1, 32], DType::F16);
        let o = fwd(&q, &k, &k, &AttnOptions { causal: true, ..Default::default() }).unwrap();
        assert_eq!((o.out.shape(), o.lse.shape()), (&[b, sq, 2, 32][..], &[b, 2, sq][..]));
    }
    let mut v = V::ok();
    (v.tq, v.tk, v.cu_q, v.cu_k, v.max_q, v.max_k) = (0, 0, i32s(&[0]), i32s(&[0]), 0, 0);
    let o = v.run().unwrap();
    assert_eq!((o.out.shape(), o.lse.shape()), (&[0, 2, 64][..], &[2, 0][..]));
    let mut v = V::ok();
    (v.tq, v.cu_q, v.max_q) = (3, i32s(&[0, 0, 0]), 0);
    let o = v.run().unwrap();
    assert!(o.lse.to_f32_vec().unwrap().iter().all(|&l| l == f32::NEG_INFINITY));
}

#[test]
fn canonical_problem() {
    let q = t(&[2, 5, 4, 64], DType::BF16);
    let k = t(&[2, 7, 2, 64], DType::BF16);
    let p: Problem = validate_fwd(&q.view(), &k.view(), &k.view(), None, &AttnOptions { causal: true, window: (3, 9), ..Default::default() }).unwrap();
    assert_eq!((p.window_left, p.window_right), (3, 0));
    assert_eq!(p.scale, 1.0 / 8.0);
    assert_eq!((p.batch, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k, p.hq, p.hk), (2, 5, 7, 10, 14, 4, 2));
    assert_eq!((p.q.batch, p.q.row, p.q.head), (5 * 4 * 64, 4 * 64, 64));
    let p = validate_fwd(&q.view(), &k.view(), &k.view(), None, &AttnOptions { window: (7, 5), ..Default::default() }).unwrap();
    assert_eq!((p.window_left, p.window_right), (-1, -1), "windows that cannot bind are unbounded");
    let v = V::ok();
    let (q, k) = (t(&[5, 2, 64], DType::BF16), t(&[8, 2, 64], DType::BF16));
    let p = validate_fwd(&q.view(), &k.view(), &k.view(), Some(&v.varlen().views()), &AttnOptions::default()).unwrap();
    assert!(p.varlen && p.seqlens.is_none(), "lengths are read only where they run (the CPU path)");
    assert_eq!((p.batch, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k), (2, 3, 4, 5, 8));
    assert_eq!((p.q.batch, p.q.row, p.q.head), (0, 128, 64));
}

/// One random near-miss call: a valid problem with a few of its pieces broken.
#[derive(Clone, Debug)]
struct Garbage {
    varlen: bool,
    /// b, sq, sk, hk, group, d.
    dims: (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    /// Per sequence (len_q, len_k); tail rows of q and k past the last sequence.
    seqs: Vec<(usize, usize)>,
    tail: (usize, usize),
    seqused: (bool, bool),
    /// Each edit: (what, index, value), applied to the valid call.
    edits: Vec<(u8, usize, i64)>,
    strided: u8,
    opts: AttnOptions,
}

fn garbage() -> impl Strategy<Value = Garbage> {
    let dims = (0usize..=3, 0usize..=5, 0usize..=5, 1usize..=2, 1usize..=2, proptest::sample::select(vec![32usize, 64]));
    let seqs = proptest::collection::vec((0usize..=4, 0usize..=4), 0..=3);
    let edit = (0u8..12, 0usize..6, -3i64..=9);
    let edits = prop_oneof![2 => Just(vec![]), 3 => proptest::collection::vec(edit, 1..=2)];
    let opts = (
        any::<bool>(),
        prop_oneof![4 => Just(-1i64), 2 => 0i64..4, 1 => -3i64..=-2],
        prop_oneof![4 => Just(-1i64), 2 => 0i64..4, 1 => -3i64..=-2],
        proptest::sample::select(vec![0.0f32, 0.0, 0.0, 2.0, -1.0, f32::NAN]),
        proptest::sample::select(vec![None, None, None, Some(0.3f32), Some(-2.0), Some(f32::INFINITY)]),
    )
        .prop_map(|(causal, l, r, softcap, softmax_scale)| AttnOptions { softmax_scale, causal, window: (l, r), softcap, ..Default::default() });
    let dtype = prop_oneof![Just(DType::BF16), Just(DType::F16)];
    (any::<bool>(), dims, dtype, seqs, (0usize..=2, 0usize..=2), any::<(bool, bool)>(), edits, 0u8..4, opts).prop_map(
        |(varlen, dims, dtype, seqs, tail, seqused, edits, strided, opts)| Garbage { varlen, dims, dtype, seqs, tail, seqused, edits, strided, opts },
    )
}

const DTYPES: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::I32];

impl Garbage {
    fn run(&self) -> (Vec<usize>, Result<FwdOutput>) {
        let (b, sq, sk, hk, group, d) = self.dims;
        let prefix = |f: fn(&(usize, usize)) -> usize| -> Vec<i32> { std::iter::once(0).chain(self.seqs.iter().scan(0, |acc, s| { *acc += f(s); Some(*acc as i32) })).collect() };
        let mut cu = [prefix(|s| s.0), prefix(|s| s.1)];
        let mut used: [Vec<i32>; 2] = [self.seqs.iter().map(|s| s.0 as i32 / 2).collect(), self.seqs.iter().map(|s| s.1 as i32 / 2).collect()];
        let mut max = [self.seqs.iter().map(|s| s.0).max().unwrap_or(0), self.seqs.iter().map(|s| s.1).max().unwrap_or(0)];
        let rows = [cu[0].last().unwrap().unsigned_abs() as usize + self.tail.0, cu[1].last().unwrap().unsigned_abs() as usize + self.tail.1];
        let mut shapes = if self.varlen {
            [vec![rows[0], hk * group, d], vec![rows[1], hk, d], vec![rows[1], hk, d]]
        } else {
            [vec![b, sq, hk * group, d], vec![b, sk, hk, d], vec![b, sk, hk, d]]
        };
        let mut dtypes = [self.dtype; 3];
        for &(what, i, x) in &self.edits {
            let n = x.unsigned_abs() as usize;
            match what {
                0..=2 => {
                    let s = &mut shapes[what as usize];
                    let value = if x < 0 { 48 } else { n };
                    match s.len() {
                        0 => s.push(value),
                        len => s[i % len] = value,
                    }
                }
                3 => shapes[i % 3].truncate(n % 5),
                4 => shapes[i % 3].push(n),
                5 => dtypes[i % 3] = DTYPES[n % 4],
                6 | 7 => {
                    let c = &mut cu[(what - 6) as usize];
                    let len = c.len();
                    if len > 0 { c[i % len] = x as i32 } else { c.push(x as i32) }
                }
                8 | 9 => {
                    let u = &mut used[(what - 8) as usize];
                    if u.is_empty() { u.push(x as i32) } else { let len = u.len(); u[i % len] = x as i32 }
                }
                10 => max[i % 2] = n,
                _ => cu[i % 2].pop().map_or((), |_| ()),
            }
        }
        let make = |s: &[usize], dt: DType| -> Tensor {
            let x = t(s, dt);
            // Sometimes view through padded strides, or with a last stride of 2 (which must be refused).
            if self.strided < 2 || s.is_empty() {
                return x;
            }
            let base = t(&s.iter().map(|&n| n + 1).collect::<Vec<_>>(), dt);
            let mut strides = base.strides().to_vec();
            if self.strided == 3 {
                *strides.last_mut().unwrap() = 2;
            }
            base.as_strided(s, &strides, 1).unwrap_or(x)
        };
        let (q, k, v) = (make(&shapes[0], dtypes[0]), make(&shapes[1], dtypes[1]), make(&shapes[2], dtypes[2]));
        let result = if self.varlen {
            let (cu_q, cu_k) = (i32s(&cu[0]), i32s(&cu[1]));
            let (uq, uk) = (self.seqused.0.then(|| i32s(&used[0])), self.seqused.1.then(|| i32s(&used[1])));
            let vl = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: Some(max[0]), max_seqlen_k: Some(max[1]), seqused_q: uq.as_ref(), seqused_k: uk.as_ref() };
            varlen_fwd(&q, &k, &v, &vl, &self.opts)
        } else {
            fwd(&q, &k, &v, &self.opts)
        };
        (shapes[0].clone(), result)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Random near-miss inputs: every call returns Ok (with the right shapes, finite out, no NaN LSE) or
    /// Err, and never panics.
    #[test]
    fn never_panics(g in garbage()) {
        let (qs, result) = g.run();
        if std::env::var_os("FA_TEST_VERBOSE").is_some() {
            eprintln!("never_panics: {}", match &result { Ok(_) => "Ok".to_string(), Err(e) => format!("{e:?}").split([' ', '(']).next().unwrap().to_string() });
        }
        if let Ok(o) = result {
            let lse_shape = if g.varlen { vec![qs[1], qs[0]] } else { vec![qs[0], qs[2], qs[1]] };
            prop_assert_eq!(o.out.shape(), &qs[..]);
            prop_assert_eq!(o.lse.shape(), &lse_shape[..]);
            prop_assert!(o.out.to_f32_vec().unwrap().iter().all(|x| x.is_finite()));
            prop_assert!(o.lse.to_f32_vec().unwrap().iter().all(|x| !x.is_nan()));
        }
    }
}

/// `fwd_into`: the provided outputs are checked like every other argument, and a strided `out` view
/// receives exactly what `fwd` returns, with the gaps between its rows left untouched.
#[test]
fn fwd_into_outputs() {
    let (b, s, h, d) = (2, 5, 2, 32);
    let x: Vec<f32> = (0..b * s * h * d).map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5).collect();
    let q = Tensor::from_f32(&x, &[b, s, h, d], DType::BF16).unwrap();
    let opts = AttnOptions { causal: true, ..Default::default() };
    let mut lse = Tensor::zeros(&[b, h, s], DType::F32, Device::Cpu).unwrap();
    let mut bad = Tensor::zeros(&[b, s, h, d + 1], DType::BF16, Device::Cpu).unwrap();
    expect_err(flash_attn::fwd_into(&q, &q, &q, &opts, &mut bad, &mut lse), |e| matches!(e, Error::Shape { arg: "out", .. }), "out");
    let mut bad = Tensor::zeros(&[b, s, h, d], DType::F16, Device::Cpu).unwrap();
    expect_err(flash_attn::fwd_into(&q, &q, &q, &opts, &mut bad, &mut lse), |e| matches!(e, Error::DTypeMismatch { arg: "out", .. }), "out");
    let mut out = Tensor::zeros(&[b, s, h, d], DType::BF16, Device::Cpu).unwrap();
    let mut bad_lse = Tensor::zeros(&[b, h, s], DType::BF16, Device::Cpu).unwrap();
    expect_err(flash_attn::fwd_into(&q, &q, &q, &opts, &mut out, &mut bad_lse), |e| matches!(e, Error::DType { arg: "lse", .. }), "lse");

    // A padded out view: rows of 2*h*d elements, the second half of each a gap that must stay 7.
    let pitch = 2 * h * d;
    let storage = Tensor::from_f32(&vec![7.0; b * s * pitch], &[b * s * pitch], DType::BF16).unwrap();
    let mut view = storage.as_strided(&[b, s, h, d], &[s * pitch, pitch, d, 1], 0).unwrap();
    flash_attn::fwd_into(&q, &q, &q, &opts, &mut view, &mut lse).unwrap();
    let expect = fwd(&q, &q, &q, &opts).unwrap();
    assert_eq!(view.to_f32_vec().unwrap(), expect.out.to_f32_vec().unwrap());
    assert_eq!(lse.to_f32_vec().unwrap(), expect.lse.to_f32_vec().unwrap());
    let all = view.as_strided(&[b * s, 2, h * d], &[pitch, h * d, 1], 0).unwrap().to_f32_vec().unwrap();
    assert!(all.chunks(h * d).skip(1).step_by(2).all(|gap| gap.iter().all(|&x| x == 7.0)), "gap written");
}

/// Inputs that describe outputs far larger than memory (broadcast views, loose max_seqlen bounds with
/// S_dmask) get errors, not a panic or an abort of the process; so do empty views past their storage.
#[test]
fn outputs_too_large_to_allocate_are_errors() {
    let too_large = |e: &Error| matches!(e, Error::TooLarge { .. } | Error::Data { .. });
    expect_err(Tensor::zeros(&[1 << 63], DType::F16, Device::Cpu), too_large, "");
    let one = t(&[1], DType::BF16);
    // q: 2^20 x 2^20 rows x 256, all one element: its out (2^49 bytes) lies past any 47-bit address space,
    // so no allocation can succeed, whatever the machine's overcommit policy.
    let q = one.as_strided(&[1 << 20, 1 << 20, 1, 256], &[0, 0, 0, 0], 0).unwrap();
    let k = one.as_strided(&[1 << 20, 4, 1, 256], &[0, 0, 0, 0], 0).unwrap();
    assert!(dense(&q, &k, &k).is_err());
    let cache = t(&[1, 8, 1, 256], DType::BF16);
    let (mut kc, mut vc) = (cache.clone(), cache.clone());
    let lens = Tensor::from_i32(vec![1; 1 << 20], &[1 << 20]).unwrap();
    let q1 = one.as_strided(&[1 << 20, 1 << 20, 1, 256], &[0, 0, 0, 0], 0).unwrap();
    assert!(flash_attn::fwd_kvcache(&q1, &mut kc, &mut vc, &flash_attn::KvCache::new(&lens), &AttnOptions::default(), &Default::default()).is_err());
    // combine over a broadcast [1, 2^31, 2^31, 1, 1] partial out: 2^62 elements, more bytes than usize holds.
    let lse1 = Tensor::zeros(&[1], DType::F32, Device::Cpu).unwrap();
    let po = one.as_strided(&[1, 1 << 31, 1 << 31, 1, 1], &[0; 5], 0).unwrap();
    let pl = lse1.as_strided(&[1, 1 << 31, 1, 1 << 31], &[0; 4], 0).unwrap();
    assert!(flash_attn::combine(&po, &pl).is_err());
    // S_dmask sized by max_seqlen bounds of 2^30 for sequences of 4 keys.
    let (q, k) = (t(&[4, 1, 32], DType::BF16), t(&[4, 1, 32], DType::BF16));
    let cu = i32s(&[0, 4]);
    let vl = Varlen { cu_seqlens_q: &cu, cu_seqlens_k: &cu, max_seqlen_q: Some(1 << 30), max_seqlen_k: Some(1 << 30), seqused_q: None, seqused_k: None };
    let extras = Extras { alibi_slopes: None, return_attn_probs: true };
    assert!(varlen_fwd_with(&q, &k, &k, &vl, &extras, &AttnOptions::default()).is_err());
    // An empty view may start at the end of its storage, not past it.
    assert!(one.as_strided(&[0, 3], &[1, 1], 1).is_ok());
    expect_err(one.as_strided(&[0, 3], &[1, 1], usize::MAX / 2), |e| matches!(e, Error::Data { .. }), "offset");
}
