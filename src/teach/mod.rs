//! Teach vigil your own classes: a head per camera or zone, trained on the box on the embeddings
//! of a folder of labelled images (`dataset.rs`, `train.rs`), versioned and compared, fed by the
//! frames worth labelling that vigil captures as it runs.

pub mod cache;
pub mod dataset;
pub mod train;
