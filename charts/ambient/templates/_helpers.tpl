{{/* Shared helpers. Resource names are fixed (not release-prefixed): the control plane's
serving certificate is issued for ambient-controlplane.<ns>.svc, and node proxies dial it. */}}

{{- define "ambient.labels" -}}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ambient.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}
{{- printf "%s/%s:%s" $root.Values.global.hub $name (default $root.Chart.AppVersion $root.Values.global.tag) -}}
{{- end -}}

{{- define "ambient.xdsAddress" -}}
{{- default (printf "ambient-controlplane.%s.svc:15012" .Release.Namespace) .Values.node.xdsAddress -}}
{{- end -}}

{{- define "ambient.credentialsSecret" -}}
{{- default "ambient-node-credentials" .Values.auth.nodeCredentials.existingSecret -}}
{{- end -}}

{{- /* The node agent's label source: node.agent.labelsFrom, or when empty "configMap" if
manifests are given (labelsConfigMap / enrolledNamespaces: installs from before the API source
keep working unchanged) and "kubernetes" otherwise. */ -}}
{{- define "ambient.labelsFrom" -}}
{{- $a := .Values.node.agent -}}
{{- if $a.labelsFrom -}}{{ $a.labelsFrom }}
{{- else if or $a.enrolledNamespaces $a.labelsConfigMap -}}configMap
{{- else -}}kubernetes
{{- end -}}
{{- end -}}

{{- define "ambient.labelsConfigMap" -}}
{{- default "ambient-enrollment" .Values.node.agent.labelsConfigMap -}}
{{- end -}}

{{- define "ambient.crdAnnotations" -}}
{{- if .Values.crds.keep }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end -}}

{{- define "ambient.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- /* "true" when the control plane runs the in-cluster waypoint controller. */ -}}
{{- define "ambient.waypoints" -}}
{{- if and .Values.waypoints.enabled .Values.controlplane.kubernetes (not .Values.controlplane.manifestConfigMap) (eq .Values.auth.mode "tokenReview") -}}true{{- end -}}
{{- end -}}
