# Removes a run's files (or only its secrets) and prunes the bundle cache; says whether it worked.
# usage: sh cleanup.sh MARK DOOMED BUNDLES KEEP
#   DOOMED   the run's directory, or its secrets.env when the run is kept
#   BUNDLES  the bundle cache: the KEEP newest stay, and uploads abandoned over a day ago go
# Prints MARK + removed, or MARK + left when DOOMED is still there.
mark=$1
doomed=$2
rm -rf -- "$doomed"
if [ -e "$doomed" ]; then echo "${mark}left"; else echo "${mark}removed"; fi
(cd "$3" 2>/dev/null && ls -1t -- *.tar.gz 2>/dev/null | tail -n +"$(($4 + 1))" | xargs -r rm -f -- ;
 find . -maxdepth 1 -name '*.part' -mmin +1440 -delete) || true
