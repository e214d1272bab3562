//! The operators of the ONNX interpreter, on row-major `f32` tensors
//! (shapes as `i64`). Opset 13+ semantics; 2-D convolution and pooling
//! in NCHW layout.

use super::{Attr, Node};
use crate::backend::cpu::{View, activate, gemm, layer_norm, softmax_rows};
use crate::backend::{Activation, Array, DeviceKind, HostWeight, Pass};
use crate::budget::{Budget, Reservation};
use crate::error::{Error, invalid_input};
use crate::tensor::{Data, Tensor, element_count};
use std::collections::HashMap;

/// Where the interpreter's products, normalisations and activations run:
/// the graph's backend. On the CPU they run on the host tensors in place;
/// on a device the operands go there (weights once, at load: `prepared`),
/// the kernel runs, and the result comes back. The other operators run on
/// the host.
pub(crate) struct Compute<'a> {
    pub pass: Pass<'a>,
    pub prepared: &'a HashMap<String, Array>,
}

impl Compute<'_> {
    fn on_host(&self) -> bool {
        self.pass.backend.info().kind == DeviceKind::Cpu
    }

    /// `alpha · a · b`: `a` is `[batch, m, k]`, `b` (named `b_name`, as a
    /// graph input or initializer) is `[1 or batch, k, n]` (`[.., n, k]`
    /// when `transpose_b`); `[batch, m, n]`.
    #[allow(clippy::too_many_arguments)]
    fn product(&self, a: &[f32], [batch, m, k]: [usize; 3], b: &[f32], b_name: &str, b_batch: usize, transpose_b: bool, n: usize, alpha: f32) -> Result<Vec<f32>, Error> {
        if self.on_host() {
            let mut out = vec![0.0; batch * m * n];
            for i in 0..batch {
                let boff = if b_batch == 1 { 0 } else { i * k * n };
                let bview = if transpose_b { View::dense(n, k, boff).t() } else { View::dense(k, n, boff) };
                gemm(alpha, a, View::dense(m, k, i * m * k), b, bview, 0.0, &mut out, View::dense(m, n, i * m * n));
            }
            return Ok(out);
        }
        let a = self.pass.upload(vec![batch, m, k], a.to_vec())?;
        let uploaded;
        let b = match self.prepared.get(b_name) {
            Some(prepared) => prepared,
            None => {
                let shape = if transpose_b { vec![b_batch, n, k] } else { vec![b_batch, k, n] };
                uploaded = self.pass.upload(shape, b.to_vec())?;
                &uploaded
            }
        };
        self.pass.download(&self.pass.matmul(&a, b, transpose_b, alpha)?)
    }

    /// `f` on every element of `values`.
    fn activation(&self, mut values: Vec<f32>, f: Activation) -> Result<Vec<f32>, Error> {
        if self.on_host() {
            activate(&mut values, f);
            return Ok(values);
        }
        let n = values.len();
        self.pass.download(&self.pass.activation(&self.pass.upload(vec![n], values)?, f)?)
    }

    /// Softmax of each row of `width`.
    fn softmax(&self, mut values: Vec<f32>, width: usize) -> Result<Vec<f32>, Error> {
        if self.on_host() || width == 0 {
            softmax_rows(&mut values, width);
            return Ok(values);
        }
        let rows = values.len() / width;
        self.pass.download(&self.pass.softmax(&self.pass.upload(vec![rows, width], values)?)?)
    }

    /// Layer normalisation of each row of `gamma.len()`.
    fn layer_norm(&self, mut values: Vec<f32>, gamma: &[f32], beta: &[f32], eps: f32) -> Result<Vec<f32>, Error> {
        let width = gamma.len();
        if self.on_host() || width == 0 {
            layer_norm(&mut values, gamma, beta, eps);
            return Ok(values);
        }
        let backend = self.pass.backend;
        let (g, b) = (backend.weight(HostWeight::vector(gamma.to_vec()))?, backend.weight(HostWeight::vector(beta.to_vec()))?);
        let rows = values.len() / width;
        self.pass.download(&self.pass.layer_norm(&self.pass.upload(vec![rows, width], values)?, &g, &b, eps)?)
    }
}

/// Reserves every buffer a node allocates from the pass's budget before
/// allocating it, and holds the reservations for as long as the pass keeps
/// the node's outputs.
pub(crate) struct Alloc<'b> {
    budget: &'b Budget,
    op: String,
    held: Vec<Reservation>,
}

impl<'b> Alloc<'b> {
    pub fn new(budget: &'b Budget) -> Alloc<'b> {
        Alloc { budget, op: String::new(), held: Vec::new() }
    }

    /// Room for `elements` of `what` (width 4: f32) in `shape`.
    fn f32(&mut self, shape: &[usize], what: &str) -> Result<(), Error> {
        self.bytes(shape, 4, what)
    }

    fn bytes(&mut self, shape: &[usize], width: usize, what: &str) -> Result<(), Error> {
        let reservation = self.budget.reserve_tensor(shape, width, || format!("the {} node's {what}", self.op))?;
        self.held.push(reservation);
        Ok(())
    }

    /// Room for a copy of `t`.
    pub fn like(&mut self, t: &Tensor) -> Result<(), Error> {
        self.bytes(t.shape(), t.data().width(), "output")
    }
}

/// The operators the interpreter runs.
pub const OPERATORS: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Softmax",
    "Reshape", "Flatten", "Transpose", "LayerNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Identity", "Constant",
];

fn unsupported(node: &Node, what: &str) -> Error {
    Error::Unsupported(format!("onnx: {} with {what}", node.op))
}

fn int(node: &Node, name: &str, default: i64) -> i64 {
    match node.attrs.get(name) {
        Some(Attr::Int(v)) => *v,
        _ => default,
    }
}

fn float(node: &Node, name: &str, default: f32) -> f32 {
    match node.attrs.get(name) {
        Some(Attr::Float(v)) => *v,
        _ => default,
    }
}

fn ints(node: &Node, name: &str) -> Option<Vec<i64>> {
    match node.attrs.get(name) {
        Some(Attr::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

fn string<'a>(node: &'a Node, name: &str, default: &'a str) -> &'a str {
    match node.attrs.get(name) {
        Some(Attr::Str(s)) => s,
        _ => default,
    }
}

fn arg<'a>(args: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, Error> {
    args.get(i).copied().flatten().ok_or_else(|| invalid_input(format!("input {i} is missing")))
}

/// An axis attribute, possibly negative, as an index below `rank`.
fn axis(value: i64, rank: usize) -> Result<usize, Error> {
    let a = if value < 0 { value + rank as i64 } else { value };
    usize::try_from(a).ok().filter(|&a| a < rank.max(1)).ok_or_else(|| invalid_input(format!("axis {value} outside rank {rank}")))
}

/// Runs one node, reserving what it allocates from `alloc` first.
pub(crate) fn apply(node: &Node, args: &[Option<&Tensor>], alloc: &mut Alloc<'_>, compute: &Compute) -> Result<Vec<Tensor>, Error> {
    alloc.op.clone_from(&node.op);
    let x = || arg(args, 0);
    // Operators whose output is the size of their first input.
    if matches!(
        node.op.as_str(),
        "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Gelu" | "Softmax" | "Reshape" | "Flatten" | "Transpose" | "LayerNormalization" | "Identity"
    ) {
        alloc.like(x()?)?;
    }
    let out = match node.op.as_str() {
        "Add" => binary(x()?, arg(args, 1)?, |a, b| a + b, alloc)?,
        "Sub" => binary(x()?, arg(args, 1)?, |a, b| a - b, alloc)?,
        "Mul" => binary(x()?, arg(args, 1)?, |a, b| a * b, alloc)?,
        "Div" => binary(x()?, arg(args, 1)?, |a, b| a / b, alloc)?,
        "Relu" => activation(x()?, Activation::Relu, compute)?,
        "Sigmoid" => activation(x()?, Activation::Sigmoid, compute)?,
        "Tanh" => activation(x()?, Activation::Tanh, compute)?,
        "Erf" => activation(x()?, Activation::Erf, compute)?,
        "Gelu" => match string(node, "approximate", "none") {
            "none" => activation(x()?, Activation::Gelu, compute)?,
            "tanh" => activation(x()?, Activation::GeluTanh, compute)?,
            other => return Err(unsupported(node, &format!("approximate={other:?}"))),
        },
        "Softmax" => softmax(x()?, int(node, "axis", -1), compute)?,
        "MatMul" => matmul(x()?, arg(args, 1)?, &node.inputs[1], alloc, compute)?,
        "Gemm" => gemm_op(node, x()?, arg(args, 1)?, args.get(2).copied().flatten(), alloc, compute)?,
        "Conv" => conv(node, x()?, arg(args, 1)?, args.get(2).copied().flatten(), alloc, compute)?,
        "MaxPool" | "AveragePool" => {
            if node.outputs.len() > 1 {
                return Err(unsupported(node, "an Indices output"));
            }
            pool(node, x()?, alloc)?
        }
        "GlobalAveragePool" => global_average_pool(x()?, alloc)?,
        "Reshape" => reshape(x()?, arg(args, 1)?, int(node, "allowzero", 0) != 0)?,
        "Flatten" => {
            let t = x()?;
            let a = if t.shape().is_empty() { 0 } else { axis(int(node, "axis", 1), t.shape().len() + 1)? };
            let shape = vec![t.shape()[..a].iter().product(), t.shape()[a..].iter().product()];
            Tensor::new(shape, t.data().clone())?
        }
        "Transpose" => transpose(x()?, ints(node, "perm"))?,
        "LayerNormalization" => {
            if node.outputs.len() > 1 {
                return Err(unsupported(node, "Mean or InvStdDev outputs"));
            }
            layer_norm_op(x()?, arg(args, 1)?, args.get(2).copied().flatten(), int(node, "axis", -1), float(node, "epsilon", 1e-5), compute)?
        }
        "Identity" => x()?.clone(),
        "Constant" => constant(node, alloc)?,
        other => return Err(Error::Unsupported(format!("onnx: operator {other}"))),
    };
    Ok(vec![out])
}

fn constant(node: &Node, alloc: &mut Alloc<'_>) -> Result<Tensor, Error> {
    let attr = |n: &str| node.attrs.get(n);
    Ok(match (attr("value"), attr("value_float"), attr("value_floats"), attr("value_int"), attr("value_ints")) {
        (Some(Attr::Tensor(t)), ..) => {
            alloc.like(t)?;
            t.clone()
        }
        (_, Some(Attr::Float(v)), ..) => Tensor::f32(vec![], vec![*v]),
        (_, _, Some(Attr::Floats(v)), ..) => Tensor::f32(vec![v.len()], v.clone()),
        (_, _, _, Some(Attr::Int(v)), _) => Tensor::new(vec![], Data::I64(vec![*v]))?,
        (_, _, _, _, Some(Attr::Ints(v))) => Tensor::new(vec![v.len()], Data::I64(v.clone()))?,
        _ => return Err(unsupported(node, "no value attribute")),
    })
}

fn activation(t: &Tensor, f: Activation, compute: &Compute) -> Result<Tensor, Error> {
    let v = compute.activation(t.as_f32("the input")?.to_vec(), f)?;
    Ok(Tensor::f32(t.shape().to_vec(), v))
}

/// Numpy-style broadcasting of two shapes.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, Error> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(invalid_input(format!("shapes {a:?} and {b:?} do not broadcast"))),
            }
        })
        .collect()
}

/// Strides of `shape` seen inside `out` (0 along broadcast dimensions).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let mut step = 1;
    for i in (0..shape.len()).rev() {
        let o = i + out.len() - shape.len();
        strides[o] = if shape[i] == 1 { 0 } else { step };
        step *= shape[i];
    }
    strides
}

fn binary(a: &Tensor, b: &Tensor, f: fn(f32, f32) -> f32, alloc: &mut Alloc<'_>) -> Result<Tensor, Error> {
    let (av, bv) = (a.as_f32("the first input")?, b.as_f32("the second input")?);
    let shape = broadcast_shape(a.shape(), b.shape())?;
    alloc.f32(&shape, "output")?;
    if a.shape() == b.shape() {
        return Ok(Tensor::f32(shape, av.iter().zip(bv).map(|(&x, &y)| f(x, y)).collect()));
    }
    let (sa, sb) = (broadcast_strides(a.shape(), &shape), broadcast_strides(b.shape(), &shape));
    let n = element_count(&shape).expect("the reservation checked the size");
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; shape.len()];
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..n {
        out.push(f(av[ia], bv[ib]));
        // Advance the multi-index like an odometer.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if index[d] < shape[d] {
                break;
            }
            ia -= sa[d] * shape[d];
            ib -= sb[d] * shape[d];
            index[d] = 0;
        }
    }
    Ok(Tensor::f32(shape, out))
}

fn softmax(t: &Tensor, axis_attr: i64, compute: &Compute) -> Result<Tensor, Error> {
    let a = axis(axis_attr, t.shape().len())?;
    let mut v = t.as_f32("the input")?.to_vec();
    if v.is_empty() {
        return Ok(t.clone());
    }
    let (len, inner) = (t.shape()[a], t.shape()[a + 1..].iter().product::<usize>());
    if inner == 1 {
        v = compute.softmax(v, len.max(1))?;
    } else {
        let mut column = vec![0.0; len];
        for block in v.chunks_exact_mut(len * inner) {
            for j in 0..inner {
                (0..len).for_each(|i| column[i] = block[i * inner + j]);
                softmax_rows(&mut column, len);
                (0..len).for_each(|i| block[i * inner + j] = column[i]);
            }
        }
    }
    Ok(Tensor::f32(t.shape().to_vec(), v))
}

fn matmul(a: &Tensor, b: &Tensor, b_name: &str, alloc: &mut Alloc<'_>, compute: &Compute) -> Result<Tensor, Error> {
    let (av, bv) = (a.as_f32("A")?, b.as_f32("B")?);
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() < 2 || sb.len() < 2 {
        return Err(invalid_input(format!("MatMul of {sa:?} and {sb:?}: both need rank 2 or more")));
    }
    let (m, k, k2, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 2], sb[sb.len() - 1]);
    let (batch_a, batch_b) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
    let nb_b: usize = batch_b.iter().product();
    if k != k2 || (nb_b != 1 && batch_a != batch_b) {
        return Err(invalid_input(format!("MatMul of {sa:?} and {sb:?}: inner or batch dimensions differ")));
    }
    let mut shape = batch_a.to_vec();
    shape.extend([m, n]);
    alloc.f32(&shape, "output")?;
    let batches: usize = batch_a.iter().product();
    if batches * m * n == 0 {
        // Nothing to compute, however many empty batches the shapes name.
        return Ok(Tensor::f32(shape, Vec::new()));
    }
    let out = if nb_b == 1 {
        // One right-hand matrix: fold the batch into the rows.
        compute.product(av, [1, batches * m, k], bv, b_name, 1, false, n, 1.0)?
    } else {
        compute.product(av, [batches, m, k], bv, b_name, batches, false, n, 1.0)?
    };
    Ok(Tensor::f32(shape, out))
}

fn gemm_op(node: &Node, a: &Tensor, b: &Tensor, c: Option<&Tensor>, alloc: &mut Alloc<'_>, compute: &Compute) -> Result<Tensor, Error> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() != 2 || sb.len() != 2 {
        return Err(invalid_input(format!("Gemm needs matrices, got {sa:?} and {sb:?}")));
    }
    let (trans_a, trans_b) = (int(node, "transA", 0) != 0, int(node, "transB", 0) != 0);
    let (m, k) = if trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (k2, n) = if trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if k != k2 {
        return Err(invalid_input(format!("Gemm of {sa:?} and {sb:?}: inner dimensions differ")));
    }
    let (alpha, beta) = (float(node, "alpha", 1.0), float(node, "beta", 1.0));
    alloc.f32(&[m, n], "output")?;
    let mut y = match c {
        Some(c) => {
            alloc.f32(&[m, n], "broadcast bias")?;
            let filled = binary(&Tensor::f32(vec![m, n], vec![0.0; m * n]), c, |_, c| c, alloc)?;
            if filled.shape() != [m, n] {
                return Err(invalid_input(format!("Gemm bias {:?} does not broadcast to [{m}, {n}]", c.shape())));
            }
            filled.as_f32("C")?.iter().map(|v| v * beta).collect()
        }
        None => vec![0.0; m * n],
    };
    let av = a.as_f32("A")?;
    let a_rows = if trans_a {
        // A transposed, as rows: the products take `a` row-major.
        alloc.f32(&[m, k], "transposed input")?;
        (0..m).flat_map(|i| (0..k).map(move |j| av[j * m + i])).collect()
    } else {
        av.to_vec()
    };
    let product = compute.product(&a_rows, [1, m, k], b.as_f32("B")?, &node.inputs[1], 1, trans_b, n, alpha)?;
    y.iter_mut().zip(product).for_each(|(y, p)| *y += p);
    Ok(Tensor::f32(vec![m, n], y))
}

/// The largest stride or dilation accepted.
const MAX_STEP: i64 = 1 << 16;

/// Spatial settings of a 2-D convolution or pooling window.
struct Window {
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
}

impl Window {
    fn of(node: &Node, kernel: [usize; 2]) -> Result<Window, Error> {
        let pair = |name: &str| -> Result<[usize; 2], Error> {
            match ints(node, name).as_deref() {
                None => Ok([1, 1]),
                Some([a, b]) if (1..=MAX_STEP).contains(a) && (1..=MAX_STEP).contains(b) => Ok([*a as usize, *b as usize]),
                Some(other) => Err(unsupported(node, &format!("{name}={other:?}"))),
            }
        };
        let pads = match (ints(node, "pads").as_deref(), string(node, "auto_pad", "NOTSET")) {
            (None, "NOTSET" | "VALID") => [0; 4],
            (Some(&[t, l, b, r]), "NOTSET") if [t, l, b, r].iter().all(|v| (0..=64).contains(v)) => {
                [t, l, b, r].map(|v| v as usize)
            }
            (p, auto) => return Err(unsupported(node, &format!("pads={p:?} auto_pad={auto}"))),
        };
        if int(node, "ceil_mode", 0) != 0 {
            return Err(unsupported(node, "ceil_mode=1"));
        }
        Ok(Window { kernel, strides: pair("strides")?, dilations: pair("dilations")?, pads })
    }

    /// Output height and width for an input of `h` x `w`. The window
    /// must fit the padded input, which bounds the kernel by the input.
    fn output(&self, h: usize, w: usize) -> Result<[usize; 2], Error> {
        let dim = |size: usize, i: usize| {
            let span = (self.kernel[i] - 1).checked_mul(self.dilations[i])?.checked_add(1)?;
            let padded = size + self.pads[i] + self.pads[i + 2];
            (padded >= span).then(|| (padded - span) / self.strides[i] + 1)
        };
        match (dim(h, 0), dim(w, 1)) {
            (Some(oh), Some(ow)) => Ok([oh, ow]),
            _ => Err(invalid_input(format!("a {h}x{w} input is smaller than the {:?} window", self.kernel))),
        }
    }

    /// The input row and column read by output (oy, ox) at kernel (ky, kx), if inside.
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize, h: usize, w: usize) -> Option<(usize, usize)> {
        let y = (oy * self.strides[0] + ky * self.dilations[0]).checked_sub(self.pads[0])?;
        let x = (ox * self.strides[1] + kx * self.dilations[1]).checked_sub(self.pads[1])?;
        (y < h && x < w).then_some((y, x))
    }
}

fn nchw(t: &Tensor) -> Result<[usize; 4], Error> {
    match t.shape() {
        &[n, c, h, w] => Ok([n, c, h, w]),
        other => Err(invalid_input(format!("expected an NCHW tensor, got dimensions {other:?}"))),
    }
}

fn conv(node: &Node, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, alloc: &mut Alloc<'_>, compute: &Compute) -> Result<Tensor, Error> {
    let [n, c, h, wd] = nchw(x)?;
    let [m, cg, kh, kw] = nchw(w)?;
    let group = int(node, "group", 1);
    if group < 1 || group as u64 > c.max(1) as u64 {
        return Err(invalid_input(format!("Conv in {group} groups of {c} channels")));
    }
    let group = group as usize;
    if c != cg * group || m % group != 0 {
        return Err(invalid_input(format!("Conv of {:?} with weights {:?} in {group} groups: channels differ", x.shape(), w.shape())));
    }
    let win = Window::of(node, [kh, kw])?;
    let [oh, ow] = win.output(h, wd)?;
    if [n, m, oh, ow].contains(&0) || x.shape().iter().product::<usize>() == 0 {
        return Err(invalid_input(format!("Conv of an empty input {:?} or to an empty output", x.shape())));
    }
    let (xv, wv) = (x.as_f32("X")?, w.as_f32("W")?);
    let mg = m / group;
    let patch = cg * kh * kw;
    alloc.f32(&[n, m, oh, ow], "output")?;
    alloc.f32(&[patch, oh, ow], "unfolded input")?;
    let mut out = vec![0.0; n * m * oh * ow];
    let mut cols = vec![0.0; patch * oh * ow];
    for b in 0..n {
        for g in 0..group {
            // im2col: one column per output position.
            for ci in 0..cg {
                let plane = &xv[((b * c) + g * cg + ci) * h * wd..][..h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = &mut cols[((ci * kh + ky) * kw + kx) * oh * ow..][..oh * ow];
                        for oy in 0..oh {
                            for ox in 0..ow {
                                row[oy * ow + ox] = win.source(oy, ox, ky, kx, h, wd).map_or(0.0, |(y, x)| plane[y * wd + x]);
                            }
                        }
                    }
                }
            }
            let offset = (b * m + g * mg) * oh * ow;
            let weights = &wv[g * mg * patch..(g + 1) * mg * patch];
            let product = compute.product(weights, [1, mg, patch], &cols, "", 1, false, oh * ow, 1.0)?;
            out[offset..offset + mg * oh * ow].copy_from_slice(&product);
        }
    }
    if let Some(bias) = bias {
        let bv = bias.as_f32("B")?;
        if bv.len() != m {
            return Err(invalid_input(format!("Conv bias has {} values for {m} channels", bv.len())));
        }
        for (i, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
            plane.iter_mut().for_each(|v| *v += bv[i % m]);
        }
    }
    Ok(Tensor::f32(vec![n, m, oh, ow], out))
}

fn pool(node: &Node, x: &Tensor, alloc: &mut Alloc<'_>) -> Result<Tensor, Error> {
    let [n, c, h, w] = nchw(x)?;
    let kernel = match ints(node, "kernel_shape").as_deref() {
        Some([a, b]) if *a > 0 && *b > 0 => [*a as usize, *b as usize],
        other => return Err(unsupported(node, &format!("kernel_shape={other:?}"))),
    };
    let win = Window::of(node, kernel)?;
    let [oh, ow] = win.output(h, w)?;
    if [n, c, h, w].contains(&0) {
        return Err(invalid_input(format!("{} of an empty input {:?}", node.op, x.shape())));
    }
    alloc.f32(&[n, c, oh, ow], "output")?;
    let max = node.op == "MaxPool";
    let count_pad = int(node, "count_include_pad", 0) != 0;
    let xv = x.as_f32("X")?;
    let mut out = Vec::with_capacity(n * c * oh * ow);
    for plane in xv.chunks_exact(h * w) {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut acc, mut count) = (if max { f32::NEG_INFINITY } else { 0.0 }, 0);
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        if let Some((y, x)) = win.source(oy, ox, ky, kx, h, w) {
                            let v = plane[y * w + x];
                            acc = if max { acc.max(v) } else { acc + v };
                            count += 1;
                        }
                    }
                }
                let divisor = if count_pad { kernel[0] * kernel[1] } else { count.max(1) };
                out.push(if max { acc } else { acc / divisor as f32 });
            }
        }
    }
    Ok(Tensor::f32(vec![n, c, oh, ow], out))
}

fn global_average_pool(x: &Tensor, alloc: &mut Alloc<'_>) -> Result<Tensor, Error> {
    let [n, c, h, w] = nchw(x)?;
    if h * w == 0 && n * c > 0 {
        return Err(invalid_input(format!("GlobalAveragePool of an empty {h}x{w} plane")));
    }
    alloc.f32(&[n, c], "output")?;
    let out = x.as_f32("X")?.chunks_exact((h * w).max(1)).map(|p| p.iter().sum::<f32>() / (h * w).max(1) as f32).collect();
    Ok(Tensor::f32(vec![n, c, 1, 1], out))
}

fn reshape(x: &Tensor, shape: &Tensor, allow_zero: bool) -> Result<Tensor, Error> {
    let Data::I64(spec) = shape.data() else {
        return Err(invalid_input("the shape input must be INT64"));
    };
    let total = element_count(x.shape()).unwrap_or(0);
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        out.push(match d {
            0 if !allow_zero => *x.shape().get(i).ok_or_else(|| invalid_input(format!("shape {spec:?} copies a dimension {i} the input lacks")))?,
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            d if d >= 0 => d as usize,
            _ => return Err(invalid_input(format!("invalid shape {spec:?}"))),
        });
    }
    let known = element_count(&out).unwrap_or(usize::MAX);
    if let Some(i) = infer {
        if known == 0 || total % known != 0 {
            return Err(invalid_input(format!("cannot reshape {:?} to {spec:?}", x.shape())));
        }
        out[i] = total / known;
    }
    if element_count(&out) != Some(total) {
        return Err(invalid_input(format!("cannot reshape {:?} to {spec:?}", x.shape())));
    }
    Tensor::new(out, x.data().clone())
}

fn transpose(x: &Tensor, perm: Option<Vec<i64>>) -> Result<Tensor, Error> {
    let rank = x.shape().len();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return Err(invalid_input(format!("perm {perm:?} is not a permutation of rank {rank}")));
    }
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let in_strides = broadcast_strides(x.shape(), x.shape());
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let gather = |read: &mut dyn FnMut(usize)| {
        let n = element_count(&shape).unwrap_or(0);
        let mut index = vec![0usize; rank];
        let mut at = 0usize;
        for _ in 0..n {
            read(at);
            for d in (0..rank).rev() {
                index[d] += 1;
                at += strides[d];
                if index[d] < shape[d] {
                    break;
                }
                at -= strides[d] * shape[d];
                index[d] = 0;
            }
        }
    };
    let data = match x.data() {
        Data::F32(v) => {
            let mut out = Vec::with_capacity(v.len());
            gather(&mut |i| out.push(v[i]));
            Data::F32(out)
        }
        Data::I64(v) => {
            let mut out = Vec::with_capacity(v.len());
            gather(&mut |i| out.push(v[i]));
            Data::I64(out)
        }
        Data::U8(v) => {
            let mut out = Vec::with_capacity(v.len());
            gather(&mut |i| out.push(v[i]));
            Data::U8(out)
        }
    };
    Tensor::new(shape, data)
}

fn layer_norm_op(x: &Tensor, scale: &Tensor, bias: Option<&Tensor>, axis_attr: i64, eps: f32, compute: &Compute) -> Result<Tensor, Error> {
    let a = axis(axis_attr, x.shape().len())?;
    let width: usize = x.shape()[a..].iter().product();
    let gamma = scale.as_f32("Scale")?;
    let beta = match bias {
        Some(b) => b.as_f32("B")?.to_vec(),
        None => vec![0.0; width],
    };
    if gamma.len() != width || beta.len() != width {
        return Err(invalid_input(format!("LayerNormalization over {width} values has a scale of {} and a bias of {}", gamma.len(), beta.len())));
    }
    let v = compute.layer_norm(x.as_f32("X")?.to_vec(), gamma, &beta, eps)?;
    Ok(Tensor::f32(x.shape().to_vec(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, attrs: &[(&str, Attr)]) -> Node {
        Node {
            op: op.into(),
            inputs: vec!["x".into(), "b".into()],
            outputs: vec!["y".into()],
            attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<HashMap<_, _>>(),
        }
    }

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::f32(shape.to_vec(), v.to_vec())
    }

    fn run(n: &Node, args: &[&Tensor]) -> Tensor {
        try_run(n, args).unwrap()
    }

    fn try_run(n: &Node, args: &[&Tensor]) -> Result<Tensor, Error> {
        let args: Vec<Option<&Tensor>> = args.iter().map(|a| Some(*a)).collect();
        let budget = Budget::new(1 << 20);
        let (cpu, prepared) = (crate::backend::cpu::CpuBackend::new(), HashMap::new());
        let compute = Compute { pass: Pass::new(&cpu, &budget), prepared: &prepared };
        Ok(apply(n, &args, &mut Alloc::new(&budget), &compute)?.remove(0))
    }

    #[test]
    fn broadcasting_arithmetic() {
        let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = t(&[3], &[10., 20., 30.]);
        assert_eq!(run(&node("Add", &[]), &[&a, &b]).data(), &Data::F32(vec![11., 22., 33., 14., 25., 36.]));
        let col = t(&[2, 1], &[1., 2.]);
        assert_eq!(run(&node("Mul", &[]), &[&a, &col]).data(), &Data::F32(vec![1., 2., 3., 8., 10., 12.]));
        assert!(try_run(&node("Add", &[]), &[&a, &t(&[2], &[1., 2.])]).is_err());
    }

    #[test]
    fn conv_and_pools_match_hand_computed_values() {
        // 1x1x3x3 input, 1x1x2x2 kernel of ones, pad 1 on the left/top only via pads.
        let x = t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
        let w = t(&[1, 1, 2, 2], &[1., 1., 1., 1.]);
        let y = run(&node("Conv", &[]), &[&x, &w]);
        assert_eq!((y.shape(), y.data()), (&[1, 1, 2, 2][..], &Data::F32(vec![12., 16., 24., 28.])));
        let padded = run(&node("Conv", &[("pads", Attr::Ints(vec![1, 1, 0, 0]))]), &[&x, &w]);
        assert_eq!(padded.as_f32("").unwrap()[..4], [1., 3., 5., 5.]);
        let k = ("kernel_shape", Attr::Ints(vec![2, 2]));
        assert_eq!(run(&node("MaxPool", &[k.clone()]), &[&x]).data(), &Data::F32(vec![5., 6., 8., 9.]));
        assert_eq!(run(&node("AveragePool", &[k]), &[&x]).data(), &Data::F32(vec![3., 4., 6., 7.]));
        assert_eq!(run(&node("GlobalAveragePool", &[]), &[&x]).data(), &Data::F32(vec![5.]));
    }

    #[test]
    fn shapes_and_transposes() {
        let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = run(&node("Transpose", &[]), &[&x]);
        assert_eq!((y.shape(), y.data()), (&[3, 2][..], &Data::F32(vec![1., 4., 2., 5., 3., 6.])));
        let shape = Tensor::new(vec![2], Data::I64(vec![-1, 2])).unwrap();
        assert_eq!(run(&node("Reshape", &[]), &[&x, &shape]).shape(), &[3, 2]);
        let bad = Tensor::new(vec![1], Data::I64(vec![4])).unwrap();
        assert!(try_run(&node("Reshape", &[]), &[&x, &bad]).is_err());
        let g = run(&node("Gemm", &[("transB", Attr::Int(1))]), &[&x, &x]);
        assert_eq!(g.data(), &Data::F32(vec![14., 32., 32., 77.]));
        let s = run(&node("Softmax", &[("axis", Attr::Int(0))]), &[&t(&[2, 1], &[0., 0.])]);
        assert_eq!(s.data(), &Data::F32(vec![0.5, 0.5]));
    }

    #[test]
    fn outputs_over_the_budget_fail_before_allocating() {
        // The crash found in the security review: a broadcast to 10^10
        // elements. With a 1 MiB budget it is refused, naming the node.
        let a = t(&[100_000, 1], &vec![0.0; 100_000]);
        let b = t(&[100_000, 1, 1], &vec![0.0; 100_000]);
        let err = try_run(&node("Add", &[]), &[&a, &b]).unwrap_err();
        assert!(matches!(&err, Error::TooLarge(m) if m.contains("the Add node's output of dimensions [100000, 100000, 1]")), "{err}");
        // A 600x600 f32 output is 1.4 MB: over; 500x500 (1.0 MB) fits.
        let big = t(&[600, 600], &vec![1.0; 360_000]);
        let err = try_run(&node("MatMul", &[]), &[&big, &big]).unwrap_err();
        assert!(matches!(&err, Error::TooLarge(m) if m.contains("MatMul node's output")), "{err}");
        let err = try_run(&node("Relu", &[]), &[&big]).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err}");
        let fits = t(&[500, 500], &vec![1.0; 250_000]);
        assert_eq!(try_run(&node("MatMul", &[]), &[&fits, &fits]).unwrap().shape(), &[500, 500]);
    }

    #[test]
    fn attributes_and_empty_shapes_cannot_make_endless_loops_or_panics() {
        // Found in review: a huge `group` over zero channels, windows whose
        // span wraps around, and empty tensors with huge dimensions beside
        // the empty one. Each is a clean error (or an empty result), at once.
        let empty = |shape: &[usize]| t(shape, &[]);
        let group = node("Conv", &[("group", Attr::Int(1 << 40))]);
        assert!(try_run(&group, &[&empty(&[1, 0, 1, 1]), &empty(&[0, 0, 1, 1])]).is_err());
        let wrap = node("MaxPool", &[("kernel_shape", Attr::Ints(vec![(1 << 32) + 1; 2])), ("dilations", Attr::Ints(vec![1 << 32; 2]))]);
        assert!(try_run(&wrap, &[&t(&[1, 1, 2, 2], &[0.0; 4])]).is_err());
        let huge_window = node("AveragePool", &[("kernel_shape", Attr::Ints(vec![1 << 20; 2]))]);
        assert!(try_run(&huge_window, &[&t(&[1, 1, 2, 2], &[0.0; 4])]).is_err());
        let batches = empty(&[1 << 30, 1 << 30, 0, 4]);
        assert_eq!(try_run(&node("MatMul", &[]), &[&batches, &t(&[4, 3], &[1.0; 12])]).unwrap().shape(), &[1 << 30, 1 << 30, 0, 3]);
        for op in ["MaxPool", "AveragePool"] {
            let pool = node(op, &[("kernel_shape", Attr::Ints(vec![1, 1])), ("pads", Attr::Ints(vec![1, 1, 1, 1]))]);
            assert!(try_run(&pool, &[&empty(&[1, 1, 0, 0])]).is_err(), "{op}");
        }
        assert!(try_run(&node("GlobalAveragePool", &[]), &[&empty(&[1, 2, 0, 3])]).is_err());
        assert_eq!(try_run(&node("Softmax", &[("axis", Attr::Int(0))]), &[&empty(&[0, 3])]).unwrap().shape(), &[0, 3]);
        let scale = empty(&[0]);
        assert_eq!(try_run(&node("LayerNormalization", &[]), &[&empty(&[2, 0]), &scale]).unwrap().shape(), &[2, 0]);
    }
}
