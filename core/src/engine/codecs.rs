//! Turning job inputs into Torch values and model outputs into files. Runs on the slot's torch
//! thread (it does blocking file I/O and tensor copies), never on the async runtime.
//!
//! Inputs (by the kind the model config declares): `text` (a string), `tensor` (JSON nested
//! arrays, or an uploaded `.npy` file), `image` (an uploaded PNG/JPEG file, to float32
//! `[1,3,H,W]` in `[0,1]`). Params: `int`, `float`, `bool`, `str`.
//! Outputs: `png` (float `[1,3,H,W]`/`[3,H,W]` in `[0,1]`), `npy`, `json`
//! (`{"shape","data"}`), and `ply`, which writes a dict of Gaussians (`means`, `scales`,
//! `rotations`, `opacities`, `colors`) as a standard binary 3DGS `.ply`.

use std::io::Write;
use std::path::Path;

use tch::{IValue, Kind, Tensor};

use super::{EngineError, ResolvedInput};

// The kinds are configuration (`[[models]]` names them), defined beside the rest of it.
pub use crate::config::{InputKind, OutputCodec, ParamKind};

fn user(msg: impl Into<String>) -> EngineError {
    EngineError::User(msg.into())
}

/// A JSON nested array of numbers to a float32 tensor.
pub fn tensor_from_json(name: &str, v: &serde_json::Value) -> Result<Tensor, EngineError> {
    let mut shape = vec![];
    let mut cursor = v;
    while let serde_json::Value::Array(a) = cursor {
        shape.push(a.len() as i64);
        match a.first() {
            Some(first) => cursor = first,
            None => break,
        }
    }
    let mut flat = Vec::new();
    fn walk(v: &serde_json::Value, depth: usize, shape: &[i64], out: &mut Vec<f32>) -> bool {
        match v {
            serde_json::Value::Array(a) => {
                depth < shape.len() && a.len() as i64 == shape[depth] && a.iter().all(|x| walk(x, depth + 1, shape, out))
            }
            serde_json::Value::Number(n) if depth == shape.len() => {
                out.push(n.as_f64().unwrap_or(0.0) as f32);
                true
            }
            _ => false,
        }
    }
    if !walk(v, 0, &shape, &mut flat) {
        return Err(user(format!("input {name:?} must be a rectangular nested array of numbers")));
    }
    Ok(Tensor::from_slice(&flat).reshape(shape.as_slice()))
}

/// One configured input of the job as a Torch value.
pub fn input_value(name: &str, kind: InputKind, value: Option<&ResolvedInput>) -> Result<IValue, EngineError> {
    let value = value.ok_or_else(|| user(format!("missing input {name:?}")))?;
    match (kind, value) {
        (InputKind::Text, ResolvedInput::Inline(serde_json::Value::String(s))) => Ok(IValue::String(s.clone())),
        (InputKind::Text, _) => Err(user(format!("input {name:?} must be a string"))),
        (InputKind::Tensor, ResolvedInput::Inline(v)) => Ok(IValue::Tensor(tensor_from_json(name, v)?)),
        (InputKind::Tensor, ResolvedInput::File(p)) => {
            let t = Tensor::read_npy(p).map_err(|e| user(format!("input {name:?} is not a readable .npy file: {e}")))?;
            Ok(IValue::Tensor(t.to_kind(Kind::Float)))
        }
        (InputKind::Image, ResolvedInput::File(p)) => {
            let t = tch::vision::image::load(p).map_err(|e| user(format!("input {name:?} is not a readable PNG/JPEG image: {e}")))?;
            Ok(IValue::Tensor((t.to_kind(Kind::Float) / 255.0).unsqueeze(0)))
        }
        (InputKind::Image, ResolvedInput::Inline(_)) => {
            Err(user(format!("input {name:?} must be an uploaded image ({{\"object\": name}})")))
        }
    }
}

/// One configured param of the job (or its default) as a Torch value.
pub fn param_value(name: &str, kind: ParamKind, value: Option<&serde_json::Value>) -> Result<IValue, EngineError> {
    let value = value.ok_or_else(|| user(format!("missing param {name:?} (and no default)")))?;
    let bad = || {
        user(format!(
            "param {name:?} must be {}",
            match kind {
                ParamKind::Int => "an integer",
                ParamKind::Float => "a number",
                ParamKind::Bool => "true or false",
                ParamKind::Str => "a string",
            }
        ))
    };
    Ok(match kind {
        ParamKind::Int => IValue::Int(value.as_i64().ok_or_else(bad)?),
        ParamKind::Float => IValue::Double(value.as_f64().ok_or_else(bad)?),
        ParamKind::Bool => IValue::Bool(value.as_bool().ok_or_else(bad)?),
        ParamKind::Str => IValue::String(value.as_str().ok_or_else(bad)?.to_string()),
    })
}

/// Flattens a model's return value into named tensors: a tensor is `output`, a tuple's items
/// `output_0`.., a dict keeps its keys.
pub fn named_outputs(value: IValue) -> Result<Vec<(String, Tensor)>, EngineError> {
    match value {
        IValue::Tensor(t) => Ok(vec![("output".into(), t)]),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                IValue::Tensor(t) => Ok((format!("output_{i}"), t)),
                other => Err(EngineError::Infra(format!("output {i} is not a tensor ({other:?})"))),
            })
            .collect(),
        IValue::TensorList(items) => Ok(items.into_iter().enumerate().map(|(i, t)| (format!("output_{i}"), t)).collect()),
        IValue::GenericDict(pairs) => pairs
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (IValue::String(k), IValue::Tensor(t)) => Ok((k, t)),
                (k, _) => Err(EngineError::Infra(format!("output {k:?} is not a string key with a tensor value"))),
            })
            .collect(),
        other => Err(EngineError::Infra(format!("the model returned {other:?}; expected a tensor, a tuple or a dict of tensors"))),
    }
}

fn io(e: impl std::fmt::Display) -> EngineError {
    EngineError::Infra(format!("cannot write output: {e}"))
}

/// Writes one tensor as `path` in `codec`.
pub fn write_tensor(t: &Tensor, codec: OutputCodec, path: &Path) -> Result<(), EngineError> {
    let t = t.to_device(tch::Device::Cpu);
    match codec {
        OutputCodec::Npy => t.write_npy(path).map_err(io),
        OutputCodec::Json => {
            let shape = t.size();
            let data: Vec<f32> = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).map_err(io)?;
            std::fs::write(path, serde_json::to_vec(&serde_json::json!({"shape": shape, "data": data})).expect("json")).map_err(io)
        }
        OutputCodec::Png => {
            let dims = t.size();
            let img = match dims.as_slice() {
                [1, 3, _, _] | [1, 1, _, _] => t.squeeze_dim(0),
                [3, _, _] | [1, _, _] => t.shallow_clone(),
                other => {
                    return Err(EngineError::Infra(format!(
                        "cannot encode a tensor of shape {other:?} as PNG; expected [1,3,H,W] or [3,H,W]"
                    )))
                }
            };
            let img = if img.size()[0] == 1 { img.repeat([3, 1, 1]) } else { img };
            let img = (img.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8);
            tch::vision::image::save(&img, path).map_err(io)
        }
        OutputCodec::Ply => Err(EngineError::Infra("the ply codec takes the whole output dict, not one tensor".into())),
    }
}

/// The keys a Gaussian-splat output dict must have for the `ply` codec.
pub const GAUSSIAN_KEYS: [&str; 5] = ["means", "scales", "rotations", "opacities", "colors"];

/// Writes Gaussians as a standard binary little-endian 3DGS `.ply` (the layout that viewers and
/// `splat-transform` read): x y z, nx ny nz, f_dc_0..2, opacity, scale_0..2, rot_0..3.
pub fn write_ply(outputs: &[(String, Tensor)], path: &Path) -> Result<usize, EngineError> {
    let get = |k: &str| -> Result<Vec<f32>, EngineError> {
        let t = outputs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t)
            .ok_or_else(|| EngineError::Infra(format!("ply output needs a {k:?} tensor")))?;
        Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(io)
    };
    let (means, scales, rots, opac, colors) = (get("means")?, get("scales")?, get("rotations")?, get("opacities")?, get("colors")?);
    let n = means.len() / 3;
    if scales.len() != n * 3 || rots.len() != n * 4 || opac.len() != n || colors.len() != n * 3 || means.len() != n * 3 {
        return Err(EngineError::Infra(format!(
            "gaussian tensors disagree on the count: means {}, scales {}, rotations {}, opacities {}, colors {}",
            means.len(),
            scales.len(),
            rots.len(),
            opac.len(),
            colors.len()
        )));
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let mut header = format!("ply\nformat binary_little_endian 1.0\nelement vertex {n}\n");
    for p in [
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1",
        "rot_2", "rot_3",
    ] {
        header.push_str(&format!("property float {p}\n"));
    }
    header.push_str("end_header\n");
    f.write_all(header.as_bytes()).map_err(io)?;
    for i in 0..n {
        let row = [
            means[i * 3],
            means[i * 3 + 1],
            means[i * 3 + 2],
            0.0,
            0.0,
            0.0,
            colors[i * 3],
            colors[i * 3 + 1],
            colors[i * 3 + 2],
            opac[i],
            scales[i * 3],
            scales[i * 3 + 1],
            scales[i * 3 + 2],
            rots[i * 4],
            rots[i * 4 + 1],
            rots[i * 4 + 2],
            rots[i * 4 + 3],
        ];
        for v in row {
            f.write_all(&v.to_le_bytes()).map_err(io)?;
        }
    }
    f.flush().map_err(io)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_arrays_become_tensors_of_their_shape() {
        let t = tensor_from_json("x", &serde_json::json!([[1, 2, 3], [4, 5, 6]])).unwrap();
        assert_eq!(t.size(), vec![2, 3]);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), vec![1., 2., 3., 4., 5., 6.]);
        assert!(tensor_from_json("x", &serde_json::json!([[1, 2], [3]])).is_err(), "ragged");
        assert!(tensor_from_json("x", &serde_json::json!([["a"]])).is_err());
    }

    #[test]
    fn params_are_typed() {
        assert!(matches!(param_value("s", ParamKind::Int, Some(&serde_json::json!(8))), Ok(IValue::Int(8))));
        assert!(param_value("s", ParamKind::Int, Some(&serde_json::json!("8"))).is_err());
        assert!(param_value("s", ParamKind::Int, None).unwrap_err().to_string().contains("missing param"));
    }

    #[test]
    fn png_and_ply_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = Tensor::rand([1, 3, 8, 6], (Kind::Float, tch::Device::Cpu));
        let p = dir.path().join("a.png");
        write_tensor(&img, OutputCodec::Png, &p).unwrap();
        let back = tch::vision::image::load(&p).unwrap();
        assert_eq!(back.size(), vec![3, 8, 6]);
        let g = |n: i64, c: i64| Tensor::ones([n, c], (Kind::Float, tch::Device::Cpu));
        let outs = vec![
            ("means".into(), g(5, 3)),
            ("scales".into(), g(5, 3)),
            ("rotations".into(), g(5, 4)),
            ("opacities".into(), g(5, 1)),
            ("colors".into(), g(5, 3)),
        ];
        let p = dir.path().join("s.ply");
        assert_eq!(write_ply(&outs, &p).unwrap(), 5);
        let bytes = std::fs::read(&p).unwrap();
        let header_end = bytes.windows(11).position(|w| w == b"end_header\n").unwrap() + 11;
        assert_eq!(bytes.len() - header_end, 5 * 17 * 4);
    }
}
