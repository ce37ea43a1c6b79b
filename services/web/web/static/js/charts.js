// Live line charts (uPlot): one series against the training step, redrawn at most once a frame.
import uPlot from "uplot";
import { h } from "./ui.js";

export function lineChart(parent, title, key) {
  const box = h("div", { class: "chart", "data-metric": key }, h("h3", {}, title));
  parent.append(box);
  const steps = [];
  const values = [];
  const empty = h("p", { class: "muted" }, "no points yet");
  box.append(empty);
  let plot = null;
  let frame = null;
  const draw = () => {
    frame = null;
    if (!plot) {
      empty.remove();
      const stroke = getComputedStyle(document.documentElement).getPropertyValue("--accent").trim() || "#2563eb";
      const axis = { stroke: getComputedStyle(document.documentElement).getPropertyValue("--muted").trim() };
      plot = new uPlot(
        {
          width: Math.max(240, box.clientWidth - 16),
          height: 180,
          legend: { show: false },
          scales: { x: { time: false } },
          axes: [{ ...axis, label: "step" }, axis],
          series: [{}, { label: title, stroke, width: 2, points: { show: steps.length < 50 } }],
        },
        [steps, values],
        box,
      );
    } else plot.setData([steps, values]);
  };
  return {
    push(step, value) {
      if (typeof step !== "number" || typeof value !== "number" || !Number.isFinite(value)) return;
      steps.push(step);
      values.push(value);
      box.dataset.points = String(steps.length);
      frame ??= requestAnimationFrame(draw);
    },
  };
}
