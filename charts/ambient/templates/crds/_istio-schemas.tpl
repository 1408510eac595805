{{- /* Our schemas for the Istio security kinds the control plane reads (controlplane/objects.py).
Structural schemas: unknown fields are pruned, and refused by kubectl's strict field
validation (the default), so a typo in a rule is caught at apply time instead of being
translated fail-closed later. Strictness follows the control plane's parser. */ -}}
{{- define "ambient.crd.stringList" -}}
type: array
items:
  type: string
{{- end }}
{{- define "ambient.crd.selector" -}}
type: object
description: Workloads (pods) this applies to, by labels; absent = namespace-wide (mesh-wide in the root namespace).
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
{{- end }}
{{- define "ambient.crd.targetRef" -}}
type: object
required: [kind, name]
properties:
  group: {type: string}
  kind: {type: string}
  name: {type: string}
  namespace: {type: string}
{{- end }}
{{- define "ambient.crd.authorizationPolicy" -}}
type: object
properties:
  spec:
    type: object
    description: Istio AuthorizationPolicy. Node proxies enforce the L4 parts; L7 attributes need a waypoint (targetRefs).
    properties:
      selector:
        {{- include "ambient.crd.selector" . | nindent 8 }}
      targetRef:
        {{- include "ambient.crd.targetRef" . | nindent 8 }}
      targetRefs:
        type: array
        items:
          {{- include "ambient.crd.targetRef" . | nindent 10 }}
      action:
        type: string
        enum: [ALLOW, DENY, AUDIT, CUSTOM]
      provider:
        type: object
        properties:
          name: {type: string}
      rules:
        type: array
        items:
          type: object
          properties:
            from:
              type: array
              items:
                type: object
                properties:
                  source:
                    type: object
                    properties:
                      {{- range list "principals" "notPrincipals" "requestPrincipals" "notRequestPrincipals" "namespaces" "notNamespaces" "ipBlocks" "notIpBlocks" "remoteIpBlocks" "notRemoteIpBlocks" "serviceAccounts" "notServiceAccounts" }}
                      {{ . }}:
                        {{- include "ambient.crd.stringList" $ | nindent 24 }}
                      {{- end }}
            to:
              type: array
              items:
                type: object
                properties:
                  operation:
                    type: object
                    properties:
                      {{- range list "hosts" "notHosts" "methods" "notMethods" "paths" "notPaths" }}
                      {{ . }}:
                        {{- include "ambient.crd.stringList" $ | nindent 24 }}
                      {{- end }}
                      {{- range list "ports" "notPorts" }}
                      {{ . }}:
                        type: array
                        items:
                          x-kubernetes-int-or-string: true
                          anyOf:
                            - type: integer
                            - type: string
                      {{- end }}
            when:
              type: array
              items:
                type: object
                required: [key]
                properties:
                  key:
                    type: string
                    minLength: 1
                  values:
                    {{- include "ambient.crd.stringList" . | nindent 20 }}
                  notValues:
                    {{- include "ambient.crd.stringList" . | nindent 20 }}
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
{{- define "ambient.crd.requestAuthentication" -}}
type: object
properties:
  spec:
    type: object
    description: Istio RequestAuthentication. Waypoints validate JWTs (invalid token 401, no token passes); node proxies cannot, so workloads it selects without a waypoint are DENIED at L4 (fail closed).
    properties:
      selector:
        {{- include "ambient.crd.selector" . | nindent 8 }}
      targetRef:
        {{- include "ambient.crd.targetRef" . | nindent 8 }}
      targetRefs:
        type: array
        items:
          {{- include "ambient.crd.targetRef" . | nindent 10 }}
      jwtRules:
        type: array
        items:
          type: object
          x-kubernetes-preserve-unknown-fields: true
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
{{- define "ambient.crd.peerAuthentication" -}}
type: object
properties:
  spec:
    type: object
    description: Istio PeerAuthentication. STRICT at L4 denies plaintext (non-mesh) clients.
    x-kubernetes-validations:
      - rule: "has(self.portLevelMtls) ? has(self.selector) : true"
        message: portLevelMtls requires a selector
    properties:
      selector:
        {{- include "ambient.crd.selector" . | nindent 8 }}
      mtls:
        type: object
        properties:
          mode:
            type: string
            enum: [UNSET, DISABLE, PERMISSIVE, STRICT]
      portLevelMtls:
        type: object
        additionalProperties:
          type: object
          properties:
            mode:
              type: string
              enum: [UNSET, DISABLE, PERMISSIVE, STRICT]
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
