"""Where and how a job runs: the driver, job records, launchers (local process or Ray job), submission."""
