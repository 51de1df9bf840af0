//! The LLM task (issue 16): LoRA on a causal language model from instruction data, through the
//! same config, loop, checkpoints and logging as the image task. Built so far: reading the
//! training records ([`records`]), the model's tokenizer ([`tokenizer`]) and chat template
//! ([`chat_template`]), the labels of a rendered record ([`labels`]) and length-grouped,
//! right-padded batches ([`batches`]), PEFT adapter folders ([`peft`]); the models are in
//! [`crate::models::causal_lm`].

pub mod batches;
pub mod chat_template;
pub mod labels;
pub mod peft;
pub mod records;
pub mod tokenizer;
