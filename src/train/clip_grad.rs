//! Gradient clipping by global norm, with `torch.nn.utils.clip_grad_norm_`'s semantics: the L2
//! norm over all gradients together; when `max_norm / (norm + 1e-6)` is below 1, every gradient
//! is multiplied by it.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::TrainError;

/// Clips the gradients of `vars` in `grads` to a global L2 norm of `max_norm` and returns their
/// norm before clipping (logged as `norm/grad`). `max_norm` ≤ 0 disables the clipping (the norm
/// is still returned). Variables without a gradient are left out, as torch leaves out
/// `p.grad is None`. A non-finite norm is returned without touching the gradients, so that the
/// caller can stop the run instead of writing NaN into the weights.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<f64, TrainError> {
    let present: Vec<(&Var, Tensor)> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()).map(|g| (v, g.clone())))
        .collect();
    if present.is_empty() {
        return Ok(0.0);
    }
    // Per-gradient sums of squares in f32 on the device, one transfer, the total in f64.
    let sums = present
        .iter()
        .map(|(_, g)| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sums: Vec<f32> = Tensor::stack(&sums, 0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?;
    let total_norm = sums.iter().map(|&s| f64::from(s)).sum::<f64>().sqrt();
    if max_norm <= 0.0 || !total_norm.is_finite() {
        return Ok(total_norm);
    }
    // As torch: the coefficient in f32, clamped at 1.
    let coef = max_norm as f32 / (total_norm as f32 + 1e-6);
    if coef < 1.0 {
        for (var, g) in present {
            let scaled = g.affine(f64::from(coef), 0.0)?;
            grads.insert(var.as_tensor(), scaled);
        }
    }
    Ok(total_norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup(values: &[&[f32]]) -> (Vec<Var>, GradStore) {
        let mut grads = GradStore::default();
        let vars: Vec<Var> = values
            .iter()
            .map(|v| {
                let var = Var::zeros(v.len(), DType::F32, &Device::Cpu).unwrap();
                grads.insert(
                    var.as_tensor(),
                    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap(),
                );
                var
            })
            .collect();
        (vars, grads)
    }

    fn grad(grads: &GradStore, var: &Var) -> Vec<f32> {
        grads.get(var.as_tensor()).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn scales_all_gradients_to_the_global_norm() {
        let (vars, mut grads) = setup(&[&[3.0, 0.0], &[4.0]]);
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((grad(&grads, &vars[0])[0] - 3.0 * coef).abs() < 1e-6);
        assert!((grad(&grads, &vars[1])[0] - 4.0 * coef).abs() < 1e-6);
    }

    #[test]
    fn below_the_limit_or_disabled_leaves_gradients_alone() {
        let (vars, mut grads) = setup(&[&[3.0, 0.0], &[4.0]]);
        assert!((clip_grad_norm(&mut grads, &vars, 10.0).unwrap() - 5.0).abs() < 1e-12);
        assert_eq!(grad(&grads, &vars[0]), vec![3.0, 0.0]);
        assert!((clip_grad_norm(&mut grads, &vars, 0.0).unwrap() - 5.0).abs() < 1e-12);
        assert_eq!(grad(&grads, &vars[1]), vec![4.0]);
    }

    #[test]
    fn variables_without_gradient_are_skipped() {
        let (mut vars, mut grads) = setup(&[&[3.0], &[4.0]]);
        vars.push(Var::zeros(2, DType::F32, &Device::Cpu).unwrap());
        grads.remove(vars[0].as_tensor());
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 4.0).abs() < 1e-12);
        assert!(grads.get(vars[2].as_tensor()).is_none());
        assert!(grads.get(vars[0].as_tensor()).is_none());
    }

    #[test]
    fn non_finite_norm_is_reported_not_spread() {
        let (vars, mut grads) = setup(&[&[f32::NAN], &[4.0]]);
        assert!(clip_grad_norm(&mut grads, &vars, 1.0).unwrap().is_nan());
        assert_eq!(grad(&grads, &vars[1]), vec![4.0]);
    }
}
