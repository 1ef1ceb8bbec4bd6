#!/bin/sh
# A stand-in for m2g with its command line: checks that the scan's BIDS inputs were pulled and
# writes a small "connectome" where m2g writes its outputs (<output>/sub-X[/ses-Y]/connectomes/).
set -eu
participant=""; session=""
while [ $# -gt 2 ]; do
  case "$1" in
    --participant_label) participant=$2; shift 2 ;;
    --session_label) session=$2; shift 2 ;;
    --pipeline|--parcellation|--voxelsize|--seeds) shift 2 ;;
    *) echo "fake_m2g: unknown argument $1" >&2; exit 2 ;;
  esac
done
input=$1; output=$2
scan="sub-$participant${session:+/ses-$session}"
entities="sub-$participant${session:+_ses-$session}"
test -f "$input/dataset_description.json" || { echo "fake_m2g: $input is not a BIDS dataset" >&2; exit 1; }
test -f "$input/$scan/dwi/${entities}_dwi.nii.gz" || { echo "fake_m2g: no dwi for $scan" >&2; exit 1; }
test -f "$input/$scan/anat/${entities}_T1w.nii.gz" || { echo "fake_m2g: no T1w for $scan" >&2; exit 1; }
if [ -d "$input/$scan/func" ]; then echo "fake_m2g: func was pulled but is not needed" >&2; exit 1; fi
out="$output/$scan/connectomes/AAL_space-MNI152NLin6_res-2x2x2"
mkdir -p "$out"
n=$(find "$input/$scan" -type f | wc -l | tr -d ' ')
printf 'source,target,weight\n1,2,%s\n' "$n" > "$out/${entities}_dwi_AAL_connectome.csv"
echo "fake_m2g: $scan: $n input files"
