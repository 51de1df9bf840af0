//! A forward computed with ordinary candle ops, given a backward of our own, on any device.
//!
//! candle differentiates every op it records and keeps every op's inputs until backward ends
//! (DESIGN.md §7): a frozen layer still gets a weight gradient, and attention keeps its score
//! matrices. Where a layer knows a cheaper backward (a frozen layer needs only the input
//! gradient; attention can recompute its probabilities from the log-sum-exp), it runs its
//! forward on detached inputs, so candle records nothing, and [`attach`] / [`attach2`] /
//! [`attach3`] hand the
//! result to a custom op whose backward is the layer's own closure. The op's forward copies the
//! precomputed output into the storage candle asks for: one copy of the output, on the CPU or
//! on the GPU (a device-to-device copy there). This is how the layers get their memory and time
//! savings on CUDA, where the CPU kernels of [`super::frozen`] and [`super::mem_attention`] do
//! not run; the same code runs (and is tested) on the CPU.

use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor,
};

use crate::Result;

/// A backward for one input: the output's gradient → the input's.
pub type Backward1 = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// A backward for two inputs: the output's gradient → each input's gradient (`None` for an
/// input that needs none).
pub type Backward2 = dyn Fn(&Tensor) -> Result<[Option<Tensor>; 2]> + Send + Sync;

/// A backward for three inputs: the output's gradient and the output itself → each input's
/// gradient (`None` for an input that needs none).
pub type Backward3 = dyn Fn(&Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync;

/// `y` (computed from `x` with nothing recorded) as a node of candle's graph whose backward is
/// `backward`; `y` itself when `x` needs no gradient. `name` names the op in errors.
pub fn attach(
    name: &'static str,
    x: &Tensor,
    y: Tensor,
    backward: Box<Backward1>,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    let op = Attached {
        name,
        output: Mutex::new(Some(y)),
        backward,
    };
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// [`attach`] for an output computed from two inputs.
pub fn attach2(
    name: &'static str,
    inputs: [&Tensor; 2],
    y: Tensor,
    backward: Box<Backward2>,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(y);
    }
    let op = Attached2 {
        name,
        output: Mutex::new(Some(y)),
        backward,
    };
    let [a, b] = inputs;
    Ok(a.apply_op2_arc(b, Arc::new(Box::new(op)))?)
}

/// [`attach`] for an output computed from three inputs.
pub fn attach3(
    name: &'static str,
    inputs: [&Tensor; 3],
    y: Tensor,
    backward: Box<Backward3>,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(y);
    }
    let op = Attached3 {
        name,
        output: Mutex::new(Some(y)),
        backward,
    };
    let [a, b, c] = inputs;
    Ok(a.apply_op3_arc(b, c, Arc::new(Box::new(op)))?)
}

struct Attached {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: Box<Backward1>,
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_over(&self.output, self.name, cpu)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_over(&self.output, self.name, cuda)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        (self.backward)(grad)
            .map(Some)
            .map_err(|e| candle_core::Error::Msg(format!("{} backward: {e}", self.name)))
    }
}

struct Attached2 {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: Box<Backward2>,
}

impl CustomOp2 for Attached2 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_over(&self.output, self.name, cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_over(&self.output, self.name, cuda)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [a, b] = (self.backward)(grad)
            .map_err(|e| candle_core::Error::Msg(format!("{} backward: {e}", self.name)))?;
        Ok((a, b))
    }
}

struct Attached3 {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: Box<Backward3>,
}

impl CustomOp3 for Attached3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_over(&self.output, self.name, cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_over(&self.output, self.name, cuda)
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The output is a node of the graph (it tracks the op that made it): products with it
        // would record a graph of the backward itself, keeping every intermediate of the
        // closure until backward ends (2.2 GiB for one 512 px attention). candle detaches the
        // gradients it hands over; the output must be detached here.
        let [a, b, c] = (self.backward)(grad, &output.detach())
            .map_err(|e| candle_core::Error::Msg(format!("{} backward: {e}", self.name)))?;
        Ok((a, b, c))
    }
}

/// The CPU storage inside a [`Storage`], if it is one.
pub(crate) fn cpu(storage: &Storage) -> Option<&CpuStorage> {
    match storage {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

/// The CUDA storage inside a [`Storage`], if it is one.
pub(crate) fn cuda(storage: &Storage) -> Option<&CudaStorage> {
    match storage {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

/// The result of a custom op whose forward ran before the op entered candle's graph: taken out
/// of `slot`, once, and copied into a fresh storage of the kind `pick` selects (exactly the
/// tensor's elements, in row-major order, whatever its layout). `op` names the op in errors.
pub(crate) fn hand_over<S: BackendStorage>(
    slot: &Mutex<Option<Tensor>>,
    op: &str,
    pick: impl Fn(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)>
where
    S::Device: BackendDevice<Storage = S>,
{
    let y = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward ran twice")))?;
    let (storage, layout) = y.storage_and_layout();
    let source = pick(&storage).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: the output computed on {:?} is not on the device of the op's inputs",
            y.device().location()
        ))
    })?;
    // SAFETY: `copy_strided_src` writes every element of the new storage (the whole shape).
    let mut out = unsafe { source.device().alloc_uninit(y.shape(), y.dtype())? };
    source.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, y.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn the_attached_backward_replaces_candles() -> Result<()> {
        let x = Var::from_tensor(&Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?)?;
        // Forward: 2x, computed detached; backward: a deliberately different rule (3·grad), so
        // the test sees which one ran.
        let y = (x.as_tensor().detach() * 2.0)?;
        let y = attach("double", x.as_tensor(), y, Box::new(|g| Ok((g * 3.0)?)))?;
        assert_eq!(y.to_vec2::<f32>()?, [[0., 2., 4.], [6., 8., 10.]]);
        let grads = y.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).map(|g| g.to_vec2::<f32>());
        assert_eq!(dx.transpose()?, Some(vec![vec![3f32; 3]; 2]));
        Ok(())
    }

    #[test]
    fn a_strided_output_is_handed_over_in_row_major_order() -> Result<()> {
        let x = Var::from_tensor(&Tensor::zeros((3, 2), DType::F64, &Device::Cpu)?)?;
        let y = Tensor::arange(0f64, 6., &Device::Cpu)?
            .reshape((2, 3))?
            .t()?;
        let want = y.to_vec2::<f64>()?;
        let y = attach("transpose", x.as_tensor(), y, Box::new(|g| Ok(g.clone())))?;
        assert_eq!(y.to_vec2::<f64>()?, want);
        Ok(())
    }

    #[test]
    fn untracked_inputs_get_the_output_itself() -> Result<()> {
        let x = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let y = attach("id", &x, x.clone(), Box::new(|g| Ok(g.clone())))?;
        assert!(!y.track_op());
        let z = attach3(
            "id3",
            [&x, &x, &x],
            x.clone(),
            Box::new(|_, _| Ok([None, None, None])),
        )?;
        assert!(!z.track_op());
        Ok(())
    }

    #[test]
    fn three_inputs_get_their_own_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2.], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[3f32, 4.], &dev)?)?;
        let c = Tensor::new(&[5f32, 6.], &dev)?;
        let y = ((a.as_tensor() * b.as_tensor())? + &c)?.detach();
        let (a2, b2) = (a.as_tensor().detach(), b.as_tensor().detach());
        let y = attach3(
            "mul_add",
            [a.as_tensor(), b.as_tensor(), &c],
            y,
            Box::new(move |g, _| Ok([Some((g * &b2)?), Some((g * &a2)?), None])),
        )?;
        let grads = y.sum_all()?.backward()?;
        let get = |t: &Tensor| grads.get(t).map(|g| g.to_vec1::<f32>()).transpose();
        assert_eq!(get(a.as_tensor())?, Some(vec![3., 4.]));
        assert_eq!(get(b.as_tensor())?, Some(vec![1., 2.]));
        assert_eq!(get(&c)?, None);
        Ok(())
    }
}
