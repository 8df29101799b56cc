"""The jobs the `hf-fsf` command runs (`demo`, `reproduce`) and the measurements behind recipes/check_scalings.py.

They are built on the library (`hf_fsf.probe`, `hf_fsf.callback`, `hf_fsf.control`, `hf_fsf.models`, ...) and the
library never imports them: `hf_fsf/` outside this folder is what a user's training script needs. Each module here
may choose a matplotlib backend, since it runs as a command, never inside someone else's program.

- `demo`        `hf-fsf demo`: a small GPT-2 trained three ways with the Trainer, and the comparison report.
- `paper`       `hf-fsf reproduce`: Fig. 1 and Fig. 2 of the paper (angles and sensitivities) with the probe.
- `desiderata`  which of SP / FL / LD / BC the NTK, MF+μP and FSC presets satisfy (recipes/check_scalings.py).
"""
