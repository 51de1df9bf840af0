//! Tiny models with random weights for tests: each weight's key and shape are learnt from the
//! model's own "missing weight" / "wrong shape" errors, so no test repeats the model's layout.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::ModelError;
use crate::nn::WeightStore;
use crate::{Error, Result};

/// `mean + std · N(0, 1)` of shape `dims`, f64, from `rng`.
pub(crate) fn randn(rng: &mut ChaCha8Rng, dims: &[usize], std: f64, mean: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            mean + std * z
        })
        .collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// A random value for the weight `key` of shape `dims`: norm scales near 1, small biases,
/// matrices with variance 1/fan_in so activations stay of order one.
fn random_weight(rng: &mut ChaCha8Rng, key: &str, dims: &[usize]) -> Result<Tensor> {
    let is_norm = key.rsplit('.').nth(1).is_some_and(|m| m.contains("norm"));
    if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        randn(rng, dims, 1.0 / (fan_in as f64).sqrt(), 0.0)
    } else if is_norm && key.ends_with(".weight") {
        randn(rng, dims, 0.2, 1.0)
    } else {
        randn(rng, dims, 0.2, 0.0)
    }
}

/// Builds a model with `build` over random f64 weights, learning each weight's key and shape
/// from the model's own "missing weight" / "wrong shape" errors. Returns the model and every
/// weight as a `Var`, by key.
pub(crate) fn random_model<T>(
    seed: u64,
    build: impl Fn(&WeightStore) -> Result<T>,
) -> Result<(T, HashMap<String, Var>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut placeholders: HashMap<String, Tensor> = HashMap::new();
    loop {
        let mut tensors: HashMap<String, Tensor> = placeholders.clone();
        tensors.extend(vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())));
        let store = WeightStore::from_tensors("random", tensors, DType::F64, Device::Cpu);
        match build(&store) {
            Ok(model) => {
                store.check_all_used()?;
                return Ok((model, vars));
            }
            Err(Error::Model(ModelError::MissingWeight { key, .. })) => {
                placeholders.insert(key, Tensor::zeros(1, DType::F64, &Device::Cpu)?);
            }
            Err(Error::Model(ModelError::WeightShape { key, expected, .. }))
                if placeholders.remove(&key).is_some() =>
            {
                let value = random_weight(&mut rng, &key, &expected)?;
                vars.insert(key, Var::from_tensor(&value)?);
            }
            Err(e) => return Err(e),
        }
    }
}
