//! The LLM task (issue 16): LoRA on a causal language model from instruction data, through the
//! same config, loop, checkpoints and logging as the image task: the training records
//! ([`records`]), the model's tokenizer ([`tokenizer`]) and chat template ([`chat_template`]),
//! the labels of a rendered record ([`labels`]), the tokenized data of a run ([`data`]),
//! length-grouped, right-padded batches ([`batches`]), the adapters ([`network`]) and their
//! PEFT folders ([`peft`]), the checks before a run and the dry run ([`preflight`]), and the
//! run itself ([`train`]: the task the shared loop steps). The models are in
//! [`crate::models::causal_lm`].

pub mod batches;
pub mod chat_template;
pub mod data;
pub mod generate;
pub mod labels;
pub mod network;
pub mod peft;
pub mod preflight;
pub mod records;
pub mod tokenizer;
pub mod train;

pub use preflight::LmPreflight;
pub use train::train;
