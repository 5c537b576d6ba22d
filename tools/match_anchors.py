"""Stage 2: embed each test user's whole history and its cosine similarity to every anchor (Eq. 4).
Writes <run>/stage2/matches.json; stage 3 takes the top K and alpha_i = sim_i / sum(sim) (Eq. 6) from it."""
from mta.run.cli import main
from mta.run.pipeline import stage2_match_anchors

if __name__ == "__main__":
    main(__doc__, stage2_match_anchors)
