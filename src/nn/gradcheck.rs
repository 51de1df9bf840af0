//! Finite-difference gradient checks: the evidence that a model's backward pass is right.
//!
//! candle silently drops gradients through some of its ops (DESIGN.md §7), so every model here is
//! checked: autograd's gradient of a scalar loss is compared, element by element, with central
//! differences `(L(θ+ε) − L(θ−ε)) / 2ε`. Run it in f64 on a tiny model.

use candle_core::{DType, Tensor, Var};

use crate::Result;

/// Settings of a check.
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    /// Perturbation size.
    pub eps: f64,
    /// Largest accepted `|autograd − fd| / max(|autograd|, |fd|, floor)`.
    pub rel_tol: f64,
    /// Gradients smaller than this are compared absolutely rather than relatively.
    pub floor: f64,
    /// Elements checked per tensor: half the largest gradients, half chosen by a seeded generator.
    pub samples: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            rel_tol: 1e-4,
            floor: 1e-7,
            samples: 6,
        }
    }
}

/// The worst element found for one tensor.
#[derive(Debug, Clone)]
pub struct GradResult {
    pub name: String,
    pub index: usize,
    pub autograd: f64,
    pub finite_difference: f64,
    pub rel_error: f64,
    /// The largest |gradient| of the tensor, to tell a checked tensor from one with no gradient.
    pub max_abs_grad: f64,
}

impl GradCheck {
    /// Checks every named variable; returns one result per variable (its worst element).
    /// `loss` must return a scalar and depend on the variables only through their values.
    pub fn run(
        &self,
        loss: impl Fn() -> Result<Tensor>,
        vars: &[(String, Var)],
    ) -> Result<Vec<GradResult>> {
        let grads = loss()?.backward()?;
        let mut results = Vec::new();
        for (name, var) in vars {
            let shape = var.as_tensor().shape().clone();
            let dtype = var.as_tensor().dtype();
            let device = var.as_tensor().device().clone();
            let original = var
                .as_tensor()
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let grad = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                None => vec![0.0; original.len()],
            };
            let max_abs_grad = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            let mut worst: Option<GradResult> = None;
            for index in self.pick(&grad, name) {
                let eval = |delta: f64| -> Result<f64> {
                    let mut values = original.clone();
                    values[index] += delta;
                    let t = Tensor::from_vec(values, shape.clone(), &device)?.to_dtype(dtype)?;
                    var.set(&t)?;
                    Ok(loss()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
                };
                let plus = eval(self.eps)?;
                let minus = eval(-self.eps)?;
                let fd = (plus - minus) / (2.0 * self.eps);
                let ag = grad[index];
                let rel_error = (ag - fd).abs() / ag.abs().max(fd.abs()).max(self.floor);
                if worst.as_ref().is_none_or(|w| rel_error > w.rel_error) {
                    worst = Some(GradResult {
                        name: name.clone(),
                        index,
                        autograd: ag,
                        finite_difference: fd,
                        rel_error,
                        max_abs_grad,
                    });
                }
            }
            var.set(&Tensor::from_vec(original, shape.clone(), &device)?.to_dtype(dtype)?)?;
            results.extend(worst);
        }
        Ok(results)
    }

    /// Runs [`GradCheck::run`] and returns a readable list of every variable that failed: a
    /// relative error over `rel_tol`, or no gradient at all.
    pub fn failures(
        &self,
        loss: impl Fn() -> Result<Tensor>,
        vars: &[(String, Var)],
    ) -> Result<Vec<String>> {
        Ok(self
            .run(loss, vars)?
            .into_iter()
            .filter(|r| r.rel_error > self.rel_tol || r.max_abs_grad == 0.0)
            .map(|r| {
                format!(
                    "{} [{}]: autograd {:.6e}, finite difference {:.6e}, relative error {:.2e}, max |grad| {:.2e}",
                    r.name, r.index, r.autograd, r.finite_difference, r.rel_error, r.max_abs_grad
                )
            })
            .collect())
    }

    fn pick(&self, grad: &[f64], name: &str) -> Vec<usize> {
        let n = grad.len();
        if n <= self.samples {
            return (0..n).collect();
        }
        let mut by_size: Vec<usize> = (0..n).collect();
        by_size.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        let mut picked: Vec<usize> = by_size.into_iter().take(self.samples / 2).collect();
        // A small deterministic generator seeded by the name, so a failure reproduces.
        let mut state = name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
        });
        while picked.len() < self.samples {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let index = (state >> 33) as usize % n;
            if !picked.contains(&index) {
                picked.push(index);
            }
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::norm::{GroupNorm, LayerNorm};
    use crate::nn::{activation, Scope, WeightStore};
    use candle_core::Device;
    use std::collections::HashMap;

    fn var(dims: &[usize], seed: u64) -> Result<Var> {
        let n: usize = dims.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|i| {
                (((i as u64 + 1).wrapping_mul(seed.wrapping_mul(2654435761) + 97) % 1000) as f64)
                    / 500.0
                    - 1.0
            })
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(
            values,
            dims,
            &Device::Cpu,
        )?)?)
    }

    #[test]
    fn detects_a_wrong_gradient() -> Result<()> {
        // softmax_last_dim from candle_nn drops gradients; ours must not, and the checker must
        // tell the two apart.
        let x = var(&[2, 5], 3)?;
        let w = var(&[2, 5], 4)?;
        let ours = || -> Result<Tensor> {
            Ok((activation::softmax_last_dim(x.as_tensor())? * w.as_tensor())?.sum_all()?)
        };
        let check = GradCheck::default();
        assert!(check.failures(ours, &[("x".into(), x.clone())])?.is_empty());
        let broken = || -> Result<Tensor> {
            Ok((candle_nn::ops::softmax_last_dim(x.as_tensor())? * w.as_tensor())?.sum_all()?)
        };
        assert!(!check
            .failures(broken, &[("x".into(), x.clone())])?
            .is_empty());
        Ok(())
    }

    #[test]
    fn norms_and_activations_have_exact_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let gw = var(&[6], 5)?;
        let gb = var(&[6], 6)?;
        let lw = var(&[4], 7)?;
        let lb = var(&[4], 8)?;
        let mut tensors = HashMap::new();
        tensors.insert("gn.weight".to_string(), gw.as_tensor().clone());
        tensors.insert("gn.bias".to_string(), gb.as_tensor().clone());
        tensors.insert("ln.weight".to_string(), lw.as_tensor().clone());
        tensors.insert("ln.bias".to_string(), lb.as_tensor().clone());
        let store = WeightStore::from_tensors("test", tensors, DType::F64, dev.clone());
        let gn = GroupNorm::new(Scope::root(&store).pp("gn"), 3, 6, 1e-5)?;
        let ln = LayerNorm::new(Scope::root(&store).pp("ln"), 4, 1e-5)?;
        let x = var(&[2, 6, 2, 4], 9)?;
        let proj = var(&[2, 6, 2, 4], 10)?;
        let loss = || -> Result<Tensor> {
            let h = gn.forward(x.as_tensor())?;
            let h = activation::silu(&h)?;
            let h = ln.forward(&h)?;
            let h = (activation::gelu(&h)? + activation::quick_gelu(&h)?)?;
            Ok((h * proj.as_tensor())?.sum_all()?)
        };
        let vars = [
            ("x".to_string(), x.clone()),
            ("gn.weight".into(), gw),
            ("gn.bias".into(), gb),
            ("ln.weight".into(), lw),
            ("ln.bias".into(), lb),
        ];
        let failures = GradCheck::default().failures(loss, &vars)?;
        assert!(failures.is_empty(), "{failures:#?}");
        Ok(())
    }
}
