#!/bin/sh
# Start Triton on the model repository named by TRITON_MODEL_REPOSITORY:
# s3://bucket/prefix on AWS, s3://host:port/bucket/prefix for an S3-compatible endpoint.
# Credentials come from the usual AWS_* variables. Extra arguments are passed to tritonserver.
#   TRITON_MODEL_REPOSITORY=s3://bucket/triton/models serve --log-verbose=1
set -eu

: "${TRITON_MODEL_REPOSITORY:?must name the model repository, e.g. s3://bucket/triton/models}"
mode="${TRITON_MODEL_CONTROL_MODE:-explicit}"

set -- --model-repository="${TRITON_MODEL_REPOSITORY}" \
       --model-control-mode="${mode}" \
       --cache-config="local,size=${TRITON_CACHE_BYTES:-268435456}" \
       "$@"
# In explicit mode Triton loads nothing at startup unless told; load the whole repository so a
# fresh container serves what the repository holds, and later changes go through the load API.
if [ "${mode}" = explicit ]; then
  set -- "$@" --load-model='*'
fi
exec tritonserver "$@"
