//! The cluster's models: which models the API accepts and lists, decided from the node
//! entries of the registry, so that every node of the API's queue group answers the same.
//!
//! Each node publishes a [`ModelDecl`] per model it serves in its node entry. A model is the
//! cluster's while a live node declares it. When two live nodes declare one name differently,
//! the definition of the node that has been up longest (smallest `started_ms`, then name) is
//! the one used, and the model is flagged `conflict`: a node that joins with a different
//! definition does not change what the cluster already accepts, and the listing says so.

use std::collections::BTreeMap;

use crate::protocol::{ModelDecl, NodeEntry};

/// One model of the cluster: the definition in force and the live nodes that declare it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterModel {
    pub decl: ModelDecl,
    /// Sorted by name.
    pub nodes: Vec<String>,
    /// Some node declares it differently from `decl`.
    pub conflict: bool,
}

/// The models the given live nodes declare, sorted by name (see the module docs for the rule
/// when they disagree). The result does not depend on the order of `nodes`.
pub fn cluster_models(nodes: &[NodeEntry]) -> BTreeMap<String, ClusterModel> {
    let mut by_age: Vec<&NodeEntry> = nodes.iter().collect();
    by_age.sort_by(|a, b| (a.started_ms, &a.node).cmp(&(b.started_ms, &b.node)));
    let mut models: BTreeMap<String, ClusterModel> = BTreeMap::new();
    for node in by_age {
        for decl in &node.models {
            let model =
                models.entry(decl.name.clone()).or_insert_with(|| ClusterModel { decl: decl.clone(), nodes: vec![], conflict: false });
            if !model.nodes.contains(&node.node) {
                model.nodes.push(node.node.clone());
            }
            model.conflict |= model.decl != *decl;
        }
    }
    for model in models.values_mut() {
        model.nodes.sort();
    }
    models
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decl(name: &str, max_attempts: u32) -> ModelDecl {
        ModelDecl {
            name: name.into(),
            engine: "noop".into(),
            max_attempts,
            timeout_ms: 1000,
            result_ttl_s: 60,
            required_inputs: vec![],
            params: vec![],
            gpus: 1,
        }
    }

    fn node(name: &str, started_ms: u64, models: Vec<ModelDecl>) -> NodeEntry {
        NodeEntry {
            node: name.into(),
            version: "0".into(),
            slots: vec![],
            started_ms,
            heartbeat_ms: 0,
            running_jobs: 0,
            peers: vec![],
            models,
        }
    }

    #[test]
    fn the_union_of_the_nodes_models_with_who_serves_each() {
        let models = cluster_models(&[node("b", 1, vec![decl("x", 3), decl("y", 3)]), node("a", 2, vec![decl("x", 3)])]);
        assert_eq!(models.keys().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(models["x"].nodes, ["a", "b"]);
        assert_eq!(models["y"].nodes, ["b"]);
        assert!(!models["x"].conflict);
    }

    #[test]
    fn a_conflict_keeps_the_longest_running_nodes_definition() {
        let models = cluster_models(&[node("young", 20, vec![decl("x", 9)]), node("old", 10, vec![decl("x", 2)])]);
        assert!(models["x"].conflict);
        assert_eq!(models["x"].decl.max_attempts, 2);
        // Same start: the name decides, so every node picks the same.
        let tie = cluster_models(&[node("b", 5, vec![decl("x", 9)]), node("a", 5, vec![decl("x", 2)])]);
        assert_eq!(tie["x"].decl.max_attempts, 2);
    }

    #[test]
    fn no_live_node_no_model() {
        assert!(cluster_models(&[]).is_empty());
        assert!(cluster_models(&[node("a", 1, vec![])]).is_empty());
    }

    proptest! {
        /// Every node of the API's queue group sees the same entries in some order: the answer
        /// must not depend on it.
        #[test]
        fn the_answer_does_not_depend_on_the_order_of_the_entries(
            entries in proptest::collection::vec((0u8..4, 0u64..3, proptest::collection::vec((0u8..3, 1u32..3), 0..3)), 0..6),
            seed in any::<u64>(),
        ) {
            let nodes: Vec<NodeEntry> = entries
                .iter()
                .enumerate()
                .map(|(i, (n, started, models))| {
                    let models = models.iter().map(|(m, a)| decl(&format!("m{m}"), *a)).collect();
                    node(&format!("n{n}-{i}"), *started, models)
                })
                .collect();
            let mut shuffled = nodes.clone();
            let len = shuffled.len().max(1);
            shuffled.rotate_left(seed as usize % len);
            shuffled.reverse();
            prop_assert_eq!(cluster_models(&nodes), cluster_models(&shuffled));
        }
    }
}
