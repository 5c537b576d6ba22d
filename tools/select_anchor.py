"""Stage 1a: embed every bank candidate (mean of per-item embeddings, Eq. 2), K-Means them into V
clusters and take the most active eligible user of each cluster as its anchor (Eq. 3).

Writes <run>/stage1/user_vectors.npy and anchors.json."""
from mta.run.cli import main
from mta.run.pipeline import stage1_select

if __name__ == "__main__":
    main(__doc__, stage1_select)
