"""The Slurm backend: dstack submits each job to an existing Slurm cluster, whose batch script
starts dstack's agent inside the allocation; Slurm decides where and when."""
