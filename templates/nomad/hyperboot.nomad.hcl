# Runs @@APP@@ from its .hvm artifact in object storage with hyperboot on Nomad
# clients that have hyperboot installed, /dev/kvm, and the raw_exec driver on.
# Rendered from hyper's templates/nomad (see templates/README.md).
#
# Credentials: Nomad Variables at nomad/jobs/@@APP@@, one item per environment
# variable, e.g.
#   nomad var put nomad/jobs/@@APP@@ AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
# (add AWS_ENDPOINT_URL=... for an S3-compatible store).
#
# hyperboot fetches the artifact when the task starts. To roll out a new build,
# run the job with the commit's immutable key, so Nomad replaces the allocations:
#   nomad job run -var key=@@APP@@/<commit>.hvm hyperboot.nomad.hcl
# With the default key (the current.hvm pointer), `nomad job restart @@APP@@`
# picks up whatever the pointer names.

variable "bucket" {
  type    = string
  default = "@@BUCKET@@"
}

variable "key" {
  type    = string
  default = "@@APP@@/current.hvm"
}

variable "region" {
  type    = string
  default = "@@AWS_REGION@@"
}

job "@@APP@@" {
  type        = "service"
  datacenters = ["@@DATACENTER@@"]

  group "app" {
    count = @@COUNT@@

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "hyperboot" {
      driver = "raw_exec"

      config {
        command = "@@HYPERBOOT@@"
        args    = ["s3://${var.bucket}/${var.key}", "-m", "@@GUEST_MEM@@", "--stop-timeout", "20"]
      }

      # hyperboot passes SIGTERM on as the image's StopSignal, then ends the VM
      # 20 s (+2 s) later; Nomad's SIGKILL comes after that.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      env {
        AWS_REGION     = var.region
        XDG_CACHE_HOME = "/var/cache"
      }

      template {
        data        = <<-EOT
          {{- with nomadVar "nomad/jobs/@@APP@@" -}}
          {{- range .Tuples }}
          {{ .K }}={{ .V }}
          {{- end }}
          {{- end }}
        EOT
        destination = "secrets/store.env"
        env         = true
      }

      resources {
        cpu    = @@CPU_MHZ@@
        memory = @@MEMORY_MB@@
      }
    }
  }
}
