{{/* Names, labels and images shared by the templates. */}}

{{- define "keelson.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keelson.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include "keelson.selector" (list . "io-engine") */}}
{{- define "keelson.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ $ctx.Chart.Name }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "keelson.image" -}}
{{- printf "%s:%s" .Values.images.keelson.repository (default .Chart.AppVersion .Values.images.keelson.tag) -}}
{{- end -}}

{{/* "true" when snapshots are served: volumeSnapshotClass.enabled true, or "auto" where the cluster serves the
snapshot API (a VolumeSnapshotClass without its CRD fails the whole install, and csi-snapshotter has nothing to
watch); else "". */}}
{{- define "keelson.snapshots" -}}
{{- $on := toString .Values.volumeSnapshotClass.enabled -}}
{{- if or (eq $on "true") (and (eq $on "auto") (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1/VolumeSnapshotClass")) -}}
true
{{- end -}}
{{- end -}}

{{/* A sidecar image: include "keelson.sidecar" .Values.images.provisioner */}}
{{- define "keelson.sidecar" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* The cluster agents' addresses, comma-separated: one per StatefulSet pod, so clients fail over to the leader. */}}
{{- define "keelson.agentURLs" -}}
{{- $name := printf "%s-cluster-agent" (include "keelson.fullname" .) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.clusterAgent.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.clusterAgent.grpcPort)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}
