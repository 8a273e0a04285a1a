// The plausible range follows the unit chosen (without JavaScript every unit's shows).
for (const select of document.querySelectorAll("select.unit")) {
  const hint = select.nextElementSibling;
  const show = () => {
    for (const r of hint.querySelectorAll(".range")) r.hidden = r.dataset.unit !== select.value;
    for (const s of hint.querySelectorAll(".sep")) s.hidden = true;
  };
  select.addEventListener("change", show);
  show();
}
