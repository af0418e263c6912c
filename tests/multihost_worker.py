"""One process of a multi-process `jaxrl` run on localhost, started by tests/test_multihost.py.

    python tests/multihost_worker.py REPORT.json jaxrl-args...

The environment carries the launch (JAXRL_COORDINATOR, JAXRL_NUM_PROCESSES, JAXRL_PROCESS_ID and
XLA_FLAGS=--xla_force_host_platform_device_count=N). The worker runs `jaxrl.cli.main(args)` and counts
what this process itself wrote, the metrics lines and the HF weight files, so the test can check that
only process 0 writes the run's records. It then writes REPORT.json and exits with the CLI's status.
"""

import json
import os
import sys


def main(report_path: str, argv: list[str]) -> int:
    import safetensors.numpy

    from jaxrl import cli
    from jaxrl.train import metrics

    written = {"metrics_lines": 0, "safetensors_files": 0}
    write_line, save_file = metrics.MetricsWriter.write, safetensors.numpy.save_file

    def counting_write(self, step, values):
        write_line(self, step, values)
        written["metrics_lines"] += int(self.enabled)

    def counting_save(*args, **kwargs):
        written["safetensors_files"] += 1
        return save_file(*args, **kwargs)

    # save_pretrained imports save_file from safetensors.numpy at call time, so patching the module works.
    metrics.MetricsWriter.write = counting_write
    safetensors.numpy.save_file = counting_save
    status = cli.main(argv)

    import jax

    report = {
        "status": status,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        **written,
    }
    with open(report_path, "w") as f:
        json.dump(report, f)
    return status


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
