# Removes a run's files (all of them, or what a kept run must not keep) and prunes the bundle cache;
# says whether it worked.
# usage: sh cleanup.sh MARK BUNDLES KEEP DOOMED...
#   BUNDLES  the bundle cache: the KEEP newest stay, and uploads abandoned over a day ago go
#   DOOMED   the run's directory, or, for a run kept on the machine, its secrets and its copy of the data
# Prints MARK + removed, or MARK + left when any DOOMED path is still there.
mark=$1
bundles=$2
keep=$3
shift 3
rm -rf -- "$@"
left=""
for doomed in "$@"; do
  if [ -e "$doomed" ]; then left=1; fi
done
if [ -n "$left" ]; then echo "${mark}left"; else echo "${mark}removed"; fi
(cd "$bundles" 2>/dev/null && ls -1t -- *.tar.gz 2>/dev/null | tail -n +"$((keep + 1))" | xargs -r rm -f -- ;
 find . -maxdepth 1 -name '*.part' -mmin +1440 -delete) || true
