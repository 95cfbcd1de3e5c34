//! `Linear`: a weight `[out, in]` with optional bias. Inputs of one row on
//! CPU (decode steps) go through the `gemv` kernel; everything else through
//! libtorch's `linear`.

use tch::{Device, Kind, Tensor};

use crate::gemv::{gemv, pool};

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight is a contiguous CPU f32 or bf16 tensor.
    fast: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight = weight.contiguous();
        let fast =
            weight.device() == Device::Cpu && matches!(weight.kind(), Kind::Float | Kind::BFloat16);
        Linear { weight, bias, fast }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let rows: i64 = size[..size.len() - 1].iter().product();
        if !(self.fast && rows == 1) {
            return x.linear(&self.weight, self.bias.as_ref());
        }
        let (out_f, in_f) = (self.weight.size()[0], self.weight.size()[1]);
        let xf = if x.kind() == Kind::Float && x.is_contiguous() {
            x.shallow_clone()
        } else {
            x.to_kind(Kind::Float).contiguous()
        };
        let y = Tensor::empty([out_f], (Kind::Float, Device::Cpu));
        // SAFETY: `xf`, `y` and the weight are contiguous CPU tensors of the
        // stated element types and lengths, alive for the whole call, and `y`
        // is not aliased.
        unsafe {
            let xs = std::slice::from_raw_parts(xf.data_ptr() as *const f32, in_f as usize);
            let ys = std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, out_f as usize);
            let n = (out_f * in_f) as usize;
            match self.weight.kind() {
                Kind::Float => {
                    let w = std::slice::from_raw_parts(self.weight.data_ptr() as *const f32, n);
                    gemv(pool(), w, in_f as usize, xs, ys)
                }
                _ => {
                    let w = std::slice::from_raw_parts(self.weight.data_ptr() as *const u16, n);
                    gemv(pool(), w, in_f as usize, xs, ys)
                }
            }
        }
        let mut out_size = size;
        *out_size.last_mut().unwrap() = out_f;
        let mut y = y.view(out_size.as_slice());
        if x.kind() != Kind::Float {
            y = y.to_kind(x.kind());
        }
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }
}
