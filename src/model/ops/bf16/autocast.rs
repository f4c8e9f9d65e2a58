//! Mixed precision's autocast for the layers being trained (PyTorch's `torch.autocast("cpu", bfloat16)`, which
//! accelerate wraps around the trained model's forward): inside [`scope`], convolutions and linear layers with
//! f32 weights multiply on the bf16 kernels — the weights and activations rounded to bf16 as the products read
//! them, f32 sums — and so do their backward products (input and weight gradients). The weights themselves, their
//! gradients and the optimizer's state stay f32.
//!
//! The scope is per thread and only decides which op a layer records during the forward pass; the backward runs
//! whatever the forward recorded, inside or outside it.
use std::cell::Cell;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with autocast on when `on` (else as it is), restoring the previous state afterwards.
pub fn scope<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.replace(on || a.get())));
    f()
}

/// Whether a layer with f32 weights on f32 activations `x` multiplies in bf16 here: inside a [`scope`], on the
/// CPU.
pub fn active(x: &candle_core::Tensor, weight: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    ACTIVE.with(|a| a.get()) && x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(!active(&t, &t));
        scope(true, || {
            assert!(active(&t, &t));
            scope(false, || assert!(active(&t, &t), "an inner scope that asks nothing keeps it on"));
            assert!(active(&t, &t));
        });
        assert!(!active(&t, &t));
        let _ = std::panic::catch_unwind(|| scope(true, || panic!("unwinds")));
        assert!(!active(&t, &t), "a panic inside restored the state");
    }
}
