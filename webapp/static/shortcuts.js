// Keyboard shortcuts for the Annotate tab, active only while its editor is on screen:
// Ctrl+Enter submit, Ctrl+S save draft, 1-9 pick a label (not while typing in a text field).
() => {
  const visible = (el) => el && el.offsetParent !== null;
  const press = (id, event) => {
    const target = document.getElementById(id);
    const button = target && (target.tagName === "BUTTON" ? target : target.querySelector("button"));
    if (visible(button) && !button.disabled) { event.preventDefault(); button.click(); }
  };
  document.addEventListener("keydown", (event) => {
    if (!visible(document.getElementById("annotate-editor"))) return;
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.key === "Enter") return press("annotate-submit", event);
    if (mod && (event.key === "s" || event.key === "S")) return press("annotate-draft", event);
    const typing = event.target.closest("textarea, input:not([type=radio]), [contenteditable]");
    if (typing || mod || event.altKey || !/^[1-9]$/.test(event.key)) return;
    const options = document.querySelectorAll("#annotate-label input[type=radio]");
    const option = options[Number(event.key) - 1];
    if (option) { event.preventDefault(); option.click(); }
  });
}
