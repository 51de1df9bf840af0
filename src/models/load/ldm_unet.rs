//! The UNet of an LDM checkpoint (`model.diffusion_model.*`, `openaimodel.UNetModel` names):
//! its block structure read from the keys, the LDM → diffusers key conversion (DESIGN.md §3), a
//! diffusers config inferred from the tensor shapes, and the other way, a diffusers path's LDM
//! name for a given config ([`ldm_path`]: kohya's SDXL LoRA names).
//!
//! The structure comes from the keys alone: `input_blocks.N` is a resnet (with an attention at
//! `.1`) or a downsampler (`.0.op`), and downsamplers end the levels; `output_blocks.N` is a
//! resnet (with an attention) and, at the end of a level, an upsampler (`.1.conv` or `.2.conv`).
//! So the conversion needs no config, and a config (from the yaml) that disagrees with the file
//! shows up as missing or unused weights.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::MappedKey;
use crate::models::family::ModelFamily;
use crate::models::unet_config::{UNetConfig, UpBlockType};

/// One resnet slot of a level: its block index and whether an attention follows it.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    block: usize,
    attention: bool,
}

/// One level of the down or up path.
#[derive(Debug, Clone, Default, PartialEq)]
struct Level {
    slots: Vec<Slot>,
    /// The block index of the level's down/up sampler.
    sampler: Option<usize>,
}

/// What a block holds at sub-index 0/1/2, from its keys.
#[derive(Debug, Clone, Default)]
struct BlockParts {
    resnet: bool,
    attention: bool,
    /// `.0.op` (input blocks) or `.{1,2}.conv` (output blocks): the sub-index.
    sampler: Option<usize>,
}

/// The UNet's structure as an LDM checkpoint stores it.
#[derive(Debug, Clone)]
pub(crate) struct LdmUnet {
    down: Vec<Level>,
    up: Vec<Level>,
    /// Every tensor (without the `model.diffusion_model.` prefix) with its shape.
    shapes: BTreeMap<String, Vec<usize>>,
}

fn index_and_rest(text: &str) -> Option<(usize, &str)> {
    let (index, rest) = text.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

impl LdmUnet {
    /// Reads the structure from the tensor names (prefix removed); `Err` names a key that
    /// fits no SD UNet.
    pub(crate) fn parse(keys: &[(String, Vec<usize>)]) -> Result<Self, String> {
        let mut inputs: BTreeMap<usize, BlockParts> = BTreeMap::new();
        let mut outputs: BTreeMap<usize, BlockParts> = BTreeMap::new();
        for (key, _) in keys {
            let bad = || format!("`{key}` is not a tensor of a Stable Diffusion 1.x/2.x UNet");
            if let Some(rest) = key.strip_prefix("input_blocks.") {
                let (block, rest) = index_and_rest(rest).ok_or_else(bad)?;
                let (sub, rest) = index_and_rest(rest).ok_or_else(bad)?;
                let parts = inputs.entry(block).or_default();
                match (block, sub) {
                    (0, 0) => {}
                    (_, 0) if rest.starts_with("op.") => parts.sampler = Some(0),
                    (b, 0) if b > 0 => parts.resnet = true,
                    (b, 1) if b > 0 => parts.attention = true,
                    _ => return Err(bad()),
                }
            } else if let Some(rest) = key.strip_prefix("output_blocks.") {
                let (block, rest) = index_and_rest(rest).ok_or_else(bad)?;
                let (sub, rest) = index_and_rest(rest).ok_or_else(bad)?;
                let parts = outputs.entry(block).or_default();
                match sub {
                    0 => parts.resnet = true,
                    1 | 2 if rest.starts_with("conv.") => parts.sampler = Some(sub),
                    1 => parts.attention = true,
                    _ => return Err(bad()),
                }
            }
        }
        let down = Self::levels(&inputs, 1, "input_blocks")?;
        let up = Self::levels(&outputs, 0, "output_blocks")?;
        if down.len() != up.len() {
            return Err(format!(
                "the UNet has {} levels on the way down but {} on the way up",
                down.len(),
                up.len()
            ));
        }
        Ok(LdmUnet {
            down,
            up,
            shapes: keys.iter().cloned().collect(),
        })
    }

    /// Groups blocks `first..` into levels, a sampler ending each level but the last.
    fn levels(
        blocks: &BTreeMap<usize, BlockParts>,
        first: usize,
        name: &str,
    ) -> Result<Vec<Level>, String> {
        let last = blocks.keys().next_back().copied().unwrap_or(0);
        if last < first {
            return Err(format!("the checkpoint has no `{name}` resnets"));
        }
        let mut levels = vec![Level::default()];
        for block in first..=last {
            let parts = blocks
                .get(&block)
                .ok_or_else(|| format!("`{name}.{block}` is missing between its neighbours"))?;
            let level = levels.last_mut().expect("levels starts non-empty");
            if parts.resnet {
                level.slots.push(Slot {
                    block,
                    attention: parts.attention,
                });
            }
            if parts.sampler.is_some() {
                level.sampler = Some(block);
                levels.push(Level::default());
            } else if !parts.resnet {
                return Err(format!(
                    "`{name}.{block}` holds neither a resnet nor a sampler"
                ));
            }
        }
        // An input level whose downsampler is its only block carries no resnet.
        if levels.iter().any(|l| l.slots.is_empty()) {
            return Err(format!("a level of `{name}` has no resnet"));
        }
        Ok(levels)
    }

    /// The diffusers key of every tensor; `Err` names a key that fits nowhere.
    pub(crate) fn map_keys(&self, prefix: &str) -> Result<Vec<MappedKey>, String> {
        let mut resnets: BTreeMap<(bool, usize), String> = BTreeMap::new();
        let mut attentions: BTreeMap<(bool, usize), String> = BTreeMap::new();
        let mut samplers: BTreeMap<(bool, usize), String> = BTreeMap::new();
        for (output, levels) in [(false, &self.down), (true, &self.up)] {
            let kind = if output { "up_blocks" } else { "down_blocks" };
            for (i, level) in levels.iter().enumerate() {
                for (j, slot) in level.slots.iter().enumerate() {
                    resnets.insert((output, slot.block), format!("{kind}.{i}.resnets.{j}"));
                    if slot.attention {
                        attentions
                            .insert((output, slot.block), format!("{kind}.{i}.attentions.{j}"));
                    }
                }
                if let Some(block) = level.sampler {
                    let sampler = if output { "upsamplers" } else { "downsamplers" };
                    samplers.insert((output, block), format!("{kind}.{i}.{sampler}.0.conv"));
                }
            }
        }
        self.shapes
            .keys()
            .map(|key| {
                let bad = || {
                    format!("`{prefix}{key}` is not a tensor of a Stable Diffusion 1.x/2.x UNet")
                };
                let target =
                    diffusers_key(key, &resnets, &attentions, &samplers).ok_or_else(bad)?;
                Ok(MappedKey::new(target, format!("{prefix}{key}")))
            })
            .collect()
    }

    fn shape(&self, key: &str) -> Result<&[usize], String> {
        self.shapes
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("the UNet has no `{key}`, which every SD UNet has"))
    }

    /// The first attention of down level `i` (its block index).
    fn attention_block(&self, i: usize) -> Option<usize> {
        self.down[i]
            .slots
            .iter()
            .find(|s| s.attention)
            .map(|s| s.block)
    }

    /// A diffusers `unet/config.json` from the shapes, with the conventions of `version` where
    /// the shapes are silent (the number of heads: 8 per block for SD 1.x, 64-wide heads for
    /// SD 2.x; upcast attention for SD 2.x, as its LDM code computes attention in f32).
    pub(crate) fn infer_config(&self, version: ModelFamily) -> Result<Value, String> {
        let mut config = self.shape_facts()?;
        let channels: Vec<usize> = config["block_out_channels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        let heads: Vec<usize> = match version {
            ModelFamily::Sd1 => vec![8; channels.len()],
            ModelFamily::Sd2 | ModelFamily::Sdxl => channels
                .iter()
                .map(|&c| {
                    if c % 64 == 0 {
                        Ok(c / 64)
                    } else {
                        Err(format!(
                            "{version} uses 64-wide attention heads, but a level has {c} channels, \
                             so the number of heads cannot be inferred"
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        config["attention_head_dim"] = json!(heads);
        config["upcast_attention"] = json!(version == ModelFamily::Sd2);
        Ok(config)
    }

    /// The parts of the UNet's config the shapes and the structure determine (everything but
    /// the number of heads and `upcast_attention`).
    pub(crate) fn shape_facts(&self) -> Result<Value, String> {
        let conv_in = self.shape("input_blocks.0.0.weight")?;
        let conv_out = self.shape("out.2.weight")?;
        let time = self.shape("time_embed.0.weight")?;
        let (ch0, in_channels, kernel_in) = match conv_in {
            [c, i, k, _] => (*c, *i, *k),
            other => return Err(format!("`input_blocks.0.0.weight` has shape {other:?}")),
        };
        let (out_channels, kernel_out) = match conv_out {
            [o, _, k, _] => (*o, *k),
            other => return Err(format!("`out.2.weight` has shape {other:?}")),
        };
        let n = self.down.len();
        let mut channels = Vec::with_capacity(n);
        let mut layers = Vec::with_capacity(n);
        let mut depths = Vec::with_capacity(n);
        let mut down_types = Vec::with_capacity(n);
        let mut cross = BTreeSet::new();
        let mut linear = BTreeSet::new();
        for (i, level) in self.down.iter().enumerate() {
            let first = level.slots[0].block;
            let conv1 = self.shape(&format!("input_blocks.{first}.0.in_layers.2.weight"))?;
            channels.push(conv1[0]);
            layers.push(level.slots.len());
            match self.attention_block(i) {
                Some(block) => {
                    down_types.push("CrossAttnDownBlock2D");
                    let prefix = format!("input_blocks.{block}.1.");
                    let blocks: BTreeSet<usize> = self
                        .shapes
                        .keys()
                        .filter_map(|k| k.strip_prefix(&prefix))
                        .filter_map(|k| k.strip_prefix("transformer_blocks."))
                        .filter_map(|k| index_and_rest(k).map(|(t, _)| t))
                        .collect();
                    depths.push(blocks.len().max(1));
                    let to_k =
                        self.shape(&format!("{prefix}transformer_blocks.0.attn2.to_k.weight"))?;
                    cross.insert(to_k.get(1).copied().unwrap_or(0));
                    linear.insert(self.shape(&format!("{prefix}proj_in.weight"))?.len() == 2);
                }
                None => {
                    down_types.push("DownBlock2D");
                    depths.push(1);
                }
            }
        }
        let up_types: Vec<&str> = self
            .up
            .iter()
            .map(|level| {
                if level.slots.iter().any(|s| s.attention) {
                    "CrossAttnUpBlock2D"
                } else {
                    "UpBlock2D"
                }
            })
            .collect();
        let cross_attention_dim = match (cross.len(), cross.first()) {
            (1, Some(&width)) => width,
            (0, _) => {
                // Only the mid block has attention.
                let to_k = self.shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")?;
                to_k.get(1).copied().unwrap_or(0)
            }
            _ => {
                return Err(format!(
                    "the cross-attention widths differ between levels: {cross:?}"
                ))
            }
        };
        let use_linear = match linear.len() {
            0 => self.shape("middle_block.1.proj_in.weight")?.len() == 2,
            1 => linear.contains(&true),
            _ => return Err("some levels project linearly, others with 1×1 convolutions".into()),
        };
        let mut config = json!({
            "in_channels": in_channels,
            "out_channels": out_channels,
            "down_block_types": down_types,
            "up_block_types": up_types,
            "block_out_channels": channels,
            "layers_per_block": layers,
            "transformer_layers_per_block": depths,
            "cross_attention_dim": cross_attention_dim,
            "use_linear_projection": use_linear,
            "conv_in_kernel": kernel_in,
            "conv_out_kernel": kernel_out,
            "norm_num_groups": 32,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
        });
        if time.first() != Some(&(4 * ch0)) {
            config["time_embedding_dim"] = json!(time.first().copied().unwrap_or(0));
        }
        // SDXL: the pooled text embedding and six size numbers, embedded and added to the time
        // embedding (the width of each size number's features is set by the caller, who knows
        // the pooled width).
        if let Some(label) = self.shapes.get("label_emb.0.0.weight") {
            config["addition_embed_type"] = json!("text_time");
            config["projection_class_embeddings_input_dim"] = json!(label.get(1).copied());
        }
        Ok(config)
    }
}

/// The modules inside a resnet: (LDM name, diffusers name).
const RESNET_MODULES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// `in_layers.0.weight` → `norm1.weight` and the other renames inside a resnet.
fn resnet_key(rest: &str) -> Option<String> {
    RESNET_MODULES.iter().find_map(|(ldm, ours)| {
        let tail = strip_module(rest, ldm)?;
        tail.starts_with('.').then(|| format!("{ours}{tail}"))
    })
}

fn diffusers_key(
    key: &str,
    resnets: &BTreeMap<(bool, usize), String>,
    attentions: &BTreeMap<(bool, usize), String>,
    samplers: &BTreeMap<(bool, usize), String>,
) -> Option<String> {
    let simple = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        // SDXL's pooled-text and size embedding.
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(found) = simple
        .iter()
        .find_map(|(ldm, ours)| key.strip_prefix(ldm).map(|p| format!("{ours}{p}")))
    {
        return Some(found);
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (sub, rest) = index_and_rest(rest)?;
        return match sub {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                sub / 2,
                resnet_key(rest)?
            )),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    let (output, rest) = match key.strip_prefix("input_blocks.") {
        Some(rest) => (false, rest),
        None => (true, key.strip_prefix("output_blocks.")?),
    };
    let (block, rest) = index_and_rest(rest)?;
    let (sub, rest) = index_and_rest(rest)?;
    let at = (output, block);
    if !output && sub == 0 {
        if let Some(rest) = rest.strip_prefix("op.") {
            return Some(format!("{}.{rest}", samplers.get(&at)?));
        }
    }
    if output && sub > 0 {
        if let Some(rest) = rest.strip_prefix("conv.") {
            return Some(format!("{}.{rest}", samplers.get(&at)?));
        }
    }
    match sub {
        0 => Some(format!("{}.{}", resnets.get(&at)?, resnet_key(rest)?)),
        1 => Some(format!("{}.{rest}", attentions.get(&at)?)),
        _ => None,
    }
}

/// The LDM (`openaimodel.UNetModel`) path of a diffusers UNet module or tensor path, for a UNet
/// of `config`'s structure (`down_blocks.1.attentions.0.proj_in` →
/// `input_blocks.4.1.proj_in` with two resnets per level): the names kohya gives SDXL LoRA
/// modules (`lora_unet_input_blocks_4_1_proj_in`). `None` for a path that is not the UNet's.
pub fn ldm_path(config: &UNetConfig, path: &str) -> Option<String> {
    const SIMPLE: [(&str, &str); 7] = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ];
    for (ours, ldm) in SIMPLE {
        if let Some(tail) = strip_module(path, ours) {
            return Some(format!("{ldm}{tail}"));
        }
    }
    let layers = &config.layers_per_block;
    let n = layers.len();
    if let Some(rest) = path.strip_prefix("mid_block.") {
        let (kind, rest) = rest.split_once('.')?;
        let (j, tail) = split_index(rest)?;
        return match (kind, j) {
            ("resnets", 0 | 1) => Some(format!("middle_block.{}{}", 2 * j, ldm_resnet(tail)?)),
            ("attentions", 0) => Some(format!("middle_block.1{tail}")),
            _ => None,
        };
    }
    let (output, rest) = match path.strip_prefix("down_blocks.") {
        Some(rest) => (false, rest),
        None => (true, path.strip_prefix("up_blocks.")?),
    };
    let (level, rest) = index_and_rest(rest)?;
    if level >= n {
        return None;
    }
    // Each level's resnets (each with its attention at `.1`) and its sampler, one block each,
    // numbered on from the levels before; input block 0 is conv_in.
    let per_level = |i: usize| {
        if output {
            layers[n - 1 - i] + 1
        } else {
            layers[i] + 1
        }
    };
    let start = (0..level).map(per_level).sum::<usize>() + usize::from(!output);
    let blocks = if output {
        "output_blocks"
    } else {
        "input_blocks"
    };
    let (kind, rest) = rest.split_once('.')?;
    let (j, tail) = split_index(rest)?;
    let resnets = if output {
        per_level(level)
    } else {
        layers[level]
    };
    match kind {
        "resnets" if j < resnets => Some(format!("{blocks}.{}.0{}", start + j, ldm_resnet(tail)?)),
        "attentions" if j < resnets => Some(format!("{blocks}.{}.1{tail}", start + j)),
        "downsamplers" if !output && j == 0 && level + 1 < n => {
            let tail = strip_module(tail.strip_prefix('.')?, "conv")?;
            Some(format!("{blocks}.{}.0.op{tail}", start + layers[level]))
        }
        "upsamplers" if output && j == 0 && level + 1 < n => {
            let tail = strip_module(tail.strip_prefix('.')?, "conv")?;
            let attention = config.up_block_types[level] == UpBlockType::CrossAttnUpBlock2D;
            let sub = 1 + usize::from(attention);
            Some(format!("{blocks}.{}.{sub}.conv{tail}", start + resnets - 1))
        }
        _ => None,
    }
}

/// `path` minus the module `name` at its start: `""` for the module itself, `".weight"` for a
/// tensor of it, `None` for another module.
fn strip_module<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let tail = path.strip_prefix(name)?;
    (tail.is_empty() || tail.starts_with('.')).then_some(tail)
}

/// `"3.rest"` → (3, `".rest"`); `"3"` → (3, `""`).
fn split_index(text: &str) -> Option<(usize, &str)> {
    let end = text.find('.').unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

/// `.conv1.weight` → `.in_layers.2.weight` and the other renames inside a resnet (the inverse of
/// [`resnet_key`]); `""` (the resnet itself) stays.
fn ldm_resnet(tail: &str) -> Option<String> {
    let Some(rest) = tail.strip_prefix('.') else {
        return tail.is_empty().then(String::new);
    };
    RESNET_MODULES
        .iter()
        .find_map(|(ldm, ours)| strip_module(rest, ours).map(|t| format!(".{ldm}{t}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a small LDM UNet: 2 levels, 1 layer each, attention on level 0 only.
    fn keys() -> Vec<(String, Vec<usize>)> {
        let mut keys = Vec::new();
        let mut add = |k: &str, shape: &[usize]| keys.push((k.to_string(), shape.to_vec()));
        add("time_embed.0.weight", &[128, 32]);
        add("time_embed.2.weight", &[128, 128]);
        add("input_blocks.0.0.weight", &[32, 4, 3, 3]);
        add("input_blocks.1.0.in_layers.2.weight", &[32, 32, 3, 3]);
        add("input_blocks.1.0.emb_layers.1.weight", &[32, 128]);
        add("input_blocks.1.1.proj_in.weight", &[32, 32, 1, 1]);
        add(
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            &[32, 64],
        );
        add("input_blocks.2.0.op.weight", &[32, 32, 3, 3]);
        add("input_blocks.3.0.in_layers.2.weight", &[64, 32, 3, 3]);
        add("input_blocks.3.0.skip_connection.weight", &[64, 32, 1, 1]);
        add("middle_block.0.out_layers.3.weight", &[64, 64, 3, 3]);
        add(
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            &[64, 64],
        );
        add("middle_block.2.in_layers.0.weight", &[64]);
        add("output_blocks.0.0.in_layers.2.weight", &[64, 128, 3, 3]);
        add("output_blocks.1.0.in_layers.2.weight", &[64, 96, 3, 3]);
        add("output_blocks.1.1.conv.weight", &[64, 64, 3, 3]);
        add("output_blocks.2.0.in_layers.2.weight", &[32, 96, 3, 3]);
        add("output_blocks.2.1.norm.weight", &[32]);
        add("output_blocks.3.0.in_layers.2.weight", &[32, 64, 3, 3]);
        add("output_blocks.3.1.norm.weight", &[32]);
        add("out.0.weight", &[32]);
        add("out.2.weight", &[4, 32, 3, 3]);
        keys
    }

    #[test]
    fn converts_every_kind_of_key() {
        let unet = LdmUnet::parse(&keys()).unwrap();
        assert_eq!((unet.down.len(), unet.up.len()), (2, 2));
        let mapped: BTreeMap<String, String> = unet
            .map_keys("p.")
            .unwrap()
            .into_iter()
            .map(|m| (m.file_key, m.target))
            .collect();
        for (ldm, ours) in [
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.emb_layers.1.weight",
                "down_blocks.0.resnets.0.time_emb_proj.weight",
            ),
            (
                "input_blocks.1.1.proj_in.weight",
                "down_blocks.0.attentions.0.proj_in.weight",
            ),
            (
                "input_blocks.2.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.3.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "middle_block.0.out_layers.3.weight",
                "mid_block.resnets.0.conv2.weight",
            ),
            (
                "middle_block.2.in_layers.0.weight",
                "mid_block.resnets.1.norm1.weight",
            ),
            (
                "output_blocks.1.0.in_layers.2.weight",
                "up_blocks.0.resnets.1.conv1.weight",
            ),
            (
                "output_blocks.1.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.2.1.norm.weight",
                "up_blocks.1.attentions.0.norm.weight",
            ),
            (
                "output_blocks.3.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
        ] {
            assert_eq!(
                mapped.get(&format!("p.{ldm}")).map(String::as_str),
                Some(ours),
                "{ldm}"
            );
        }
    }

    #[test]
    fn infers_the_config_from_shapes() {
        let unet = LdmUnet::parse(&keys()).unwrap();
        let config = unet.infer_config(ModelFamily::Sd1).unwrap();
        assert_eq!(config["block_out_channels"], json!([32, 64]));
        assert_eq!(config["layers_per_block"], json!([1, 1]));
        assert_eq!(
            config["down_block_types"],
            json!(["CrossAttnDownBlock2D", "DownBlock2D"])
        );
        assert_eq!(
            config["up_block_types"],
            json!(["UpBlock2D", "CrossAttnUpBlock2D"])
        );
        assert_eq!(config["cross_attention_dim"], json!(64));
        assert_eq!(config["use_linear_projection"], json!(false));
        assert_eq!(config["attention_head_dim"], json!([8, 8]));
        assert!(config.get("time_embedding_dim").is_none());
        let err = unet.infer_config(ModelFamily::Sd2).unwrap_err();
        assert!(
            err.contains("64-wide") && err.contains("32 channels"),
            "{err}"
        );
    }

    #[test]
    fn keys_that_fit_nowhere_are_named() {
        let mut bad = keys();
        bad.push(("input_blocks.1.2.weight".into(), vec![1]));
        assert!(LdmUnet::parse(&bad)
            .unwrap_err()
            .contains("input_blocks.1.2.weight"));
        let mut bad = keys();
        bad.push(("label_emb.1.0.weight".into(), vec![1]));
        let err = LdmUnet::parse(&bad).unwrap().map_keys("p.").unwrap_err();
        assert!(err.contains("p.label_emb.1.0.weight"), "{err}");
        let gap: Vec<_> = keys()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("input_blocks.2."))
            .collect();
        assert!(LdmUnet::parse(&gap).unwrap_err().contains("input_blocks.2"));
    }

    /// kohya's SDXL LoRA names are the LDM paths; these are names found in kohya-trained SDXL
    /// files (two resnets per level, three levels, no attention at the first).
    #[test]
    fn sdxl_module_paths_become_kohyas_ldm_names() {
        let text = r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
            "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 2048, "use_linear_projection": true}"#;
        let config = UNetConfig::from_json_str(text, "sdxl unet").unwrap();
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                "middle_block.1.transformer_blocks.0.attn1.to_q",
            ),
            ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
            (
                "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
                "output_blocks.2.1.transformer_blocks.0.ff.net.2",
            ),
            (
                "up_blocks.1.attentions.0.proj_in",
                "output_blocks.3.1.proj_in",
            ),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
            (
                "up_blocks.2.resnets.2.conv_shortcut",
                "output_blocks.8.0.skip_connection",
            ),
            (
                "down_blocks.0.resnets.1.conv1",
                "input_blocks.2.0.in_layers.2",
            ),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            (
                "down_blocks.1.resnets.0.time_emb_proj.weight",
                "input_blocks.4.0.emb_layers.1.weight",
            ),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("time_embedding.linear_1.bias", "time_embed.0.bias"),
            ("conv_in", "input_blocks.0.0"),
        ];
        for (ours, ldm) in cases {
            assert_eq!(ldm_path(&config, ours).as_deref(), Some(ldm), "{ours}");
        }
        for outside in [
            "down_blocks.2.downsamplers.0.conv",
            "up_blocks.2.upsamplers.0.conv",
            "down_blocks.3.resnets.0",
            "down_blocks.0.resnets.2.conv1",
            "conv_inx",
            "text_model.encoder.layers.0.self_attn.q_proj",
        ] {
            assert_eq!(ldm_path(&config, outside), None, "{outside}");
        }
    }

    /// Every tensor of the tiny SD 1.x and SDXL-structured UNets goes to an LDM key and back
    /// through the loader's own LDM → diffusers conversion unchanged.
    #[test]
    fn ldm_paths_are_what_the_single_file_loader_reads_back() {
        use crate::nn::weights::TensorSource;
        for variant in ["tiny-sd1", "tiny-sdxl"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(variant)
                .join("unet");
            let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
            let source =
                TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors"))
                    .unwrap();
            // The loader does not read SDXL's label_emb (SDXL files are refused before it).
            let ours: Vec<(String, Vec<usize>)> = source
                .keys_and_shapes()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("add_embedding."))
                .collect();
            let ldm: Vec<(String, Vec<usize>)> = ours
                .iter()
                .map(|(k, shape)| {
                    let path = ldm_path(&config, k).unwrap_or_else(|| panic!("{variant}: {k}"));
                    (path, shape.clone())
                })
                .collect();
            let unet = LdmUnet::parse(&ldm).unwrap();
            let back: BTreeMap<String, String> = unet
                .map_keys("")
                .unwrap()
                .into_iter()
                .map(|m| (m.file_key, m.target))
                .collect();
            for ((key, _), (ldm_key, _)) in ours.iter().zip(&ldm) {
                assert_eq!(back.get(ldm_key), Some(key), "{variant}: {key} → {ldm_key}");
            }
        }
    }
}
