"""Stage 2: embed each test user's whole history, take the top-K anchors by cosine (Eq. 4) and
their fusion weights alpha_i = sim_i / sum(sim) (Eq. 6). Writes <run>/stage2/matches.json."""
from mta.cli import main
from mta.pipeline import stage2_match

if __name__ == "__main__":
    main(__doc__, stage2_match)
