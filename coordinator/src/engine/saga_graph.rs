//! Checking a saga's step graph: ids unique, dependencies known, no step after itself,
//! no cycle. Pure; the API turns its errors into INVALID_ARGUMENT naming the step.

/// Why a saga's step graph is refused. `step` is the index of the step to name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("step id {id:?} is used twice")]
    DuplicateStep { step: usize, id: String },
    #[error("runs after unknown step {after:?}")]
    UnknownStep { step: usize, after: String },
    #[error("runs after itself")]
    SelfDependency { step: usize },
    #[error("is part of a cycle: {cycle}")]
    Cycle { step: usize, cycle: String },
}

/// Resolves each step's `after` names to indices, refusing duplicate ids, unknown or
/// repeated dependencies and cycles: the steps must form a DAG.
pub fn resolve_dependencies(
    ids: &[String],
    after: &[Vec<String>],
) -> Result<Vec<Vec<usize>>, GraphError> {
    let mut index = std::collections::HashMap::new();
    for (step, id) in ids.iter().enumerate() {
        if index.insert(id.as_str(), step).is_some() {
            return Err(GraphError::DuplicateStep {
                step,
                id: id.clone(),
            });
        }
    }
    let mut resolved = Vec::with_capacity(ids.len());
    for (step, names) in after.iter().enumerate() {
        let mut deps: Vec<usize> = Vec::with_capacity(names.len());
        for name in names {
            let dep = *index
                .get(name.as_str())
                .ok_or_else(|| GraphError::UnknownStep {
                    step,
                    after: name.clone(),
                })?;
            if dep == step {
                return Err(GraphError::SelfDependency { step });
            }
            if !deps.contains(&dep) {
                deps.push(dep);
            }
        }
        resolved.push(deps);
    }
    // Depth-first search with colours; a grey node reached again closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; ids.len()];
    for root in 0..ids.len() {
        if colour[root] != Colour::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = Colour::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = resolved[node].get(*next) {
                *next += 1;
                match colour[dep] {
                    Colour::White => {
                        colour[dep] = Colour::Grey;
                        stack.push((dep, 0));
                    }
                    Colour::Grey => {
                        let start = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut names: Vec<&str> = stack[start..]
                            .iter()
                            .map(|(n, _)| ids[*n].as_str())
                            .collect();
                        names.push(ids[dep].as_str());
                        return Err(GraphError::Cycle {
                            step: dep,
                            cycle: names.join(" after "),
                        });
                    }
                    Colour::Black => {}
                }
            } else {
                colour[node] = Colour::Black;
                stack.pop();
            }
        }
    }
    Ok(resolved)
}
