//! `route --load-plot FILE.svg`: the tokens routed to each expert of each layer as a heatmap.
//!
//! One row per MoE layer, one column per expert. The colour is the expert's load relative to a
//! perfectly balanced one (the layer's valid picks over `E`), on a log scale: white is balanced,
//! red up to 4x and more, blue down to a quarter and less (and no token at all). With a rank
//! map, the rank boundaries are drawn over the heatmap and a column on the right gives each
//! layer's rank imbalance: the busiest rank's rows over the mean. Every cell carries its numbers
//! (`data-count`, and a tooltip), so the picture can be checked against the counts.

use std::fmt::Write;

/// One layer's load.
pub struct LayerLoad {
    /// The decoder layer.
    pub layer: usize,
    /// Valid picks per expert, `[E]`.
    pub counts: Vec<i32>,
    /// Valid picks per rank, `[R]`, with a rank map.
    pub rank_counts: Option<Vec<i32>>,
}

/// What the plot shows, for its title.
pub struct PlotInfo<'a> {
    /// The checkpoint's name.
    pub checkpoint: &'a str,
    /// `T`.
    pub tokens: usize,
    /// `K`.
    pub top_k: usize,
    /// The expert-to-rank table, when there is one.
    pub expert_ranks: Option<&'a [i32]>,
}

const LEFT: usize = 84;
const TOP: usize = 84;
const RANK_PANEL: usize = 230;
const BOTTOM: usize = 110;
const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

/// The SVG document of `layers` (all with the same number of experts).
pub fn render(info: &PlotInfo<'_>, layers: &[LayerLoad]) -> String {
    let experts = layers.first().map_or(0, |l| l.counts.len());
    let cell_w = (1200 / experts.max(1)).clamp(2, 14);
    let cell_h = (640 / layers.len().max(1)).clamp(6, 18);
    let (heat_w, heat_h) = (experts * cell_w, layers.len() * cell_h);
    let with_ranks = layers.iter().any(|l| l.rank_counts.is_some());
    let width = LEFT + heat_w.max(420) + if with_ranks { RANK_PANEL } else { 30 };
    let height = TOP + heat_h + BOTTOM;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" {FONT}>"
    );
    let _ = writeln!(svg, "<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>");
    title(&mut svg, info, layers, experts);
    for (row, load) in layers.iter().enumerate() {
        let balanced = balanced_load(&load.counts);
        let y = TOP + row * cell_h;
        for (expert, &count) in load.counts.iter().enumerate() {
            let x = LEFT + expert * cell_w;
            let ratio = balanced.map_or(0.0, |b| f64::from(count) / b);
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell_w}\" height=\"{cell_h}\" fill=\"{}\" \
                 data-layer=\"{}\" data-expert=\"{expert}\" data-count=\"{count}\">\
                 <title>layer {}, expert {expert}: {count} tokens ({ratio:.2}x balanced)</title></rect>",
                colour(balanced.map(|_| ratio)),
                load.layer,
                load.layer
            );
        }
    }
    axes(&mut svg, layers, experts, cell_w, cell_h);
    if let Some(table) = info.expert_ranks {
        rank_boundaries(&mut svg, table, cell_w, heat_h);
    }
    if with_ranks {
        rank_panel(&mut svg, layers, LEFT + heat_w.max(420) + 24, cell_h);
    }
    legend(&mut svg, TOP + heat_h + 58);
    if let Some(table) = info.expert_ranks {
        let ranks = table.iter().copied().max().map_or(0, |r| r + 1);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#444\">dashed lines: the \
             boundaries of {ranks} ranks (contiguous expert ranges)</text>",
            LEFT + 360,
            TOP + heat_h + 68
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The load of a perfectly balanced expert: the layer's valid picks over `E` (`None`: no picks).
fn balanced_load(counts: &[i32]) -> Option<f64> {
    let total: i64 = counts.iter().map(|&c| i64::from(c)).sum();
    (total > 0).then(|| total as f64 / counts.len() as f64)
}

/// The busiest rank's rows over the mean rank's (1.0: perfectly balanced; `None`: no rows).
pub fn rank_imbalance(rank_counts: &[i32]) -> Option<f64> {
    let mean = balanced_load(rank_counts)?;
    let busiest = rank_counts.iter().copied().max().unwrap_or(0);
    Some(f64::from(busiest) / mean)
}

/// Blue (a quarter of the balanced load or less) through white (balanced) to red (4x or more),
/// on a log scale; grey for a layer without picks.
fn colour(ratio: Option<f64>) -> String {
    const BLUE: [f64; 3] = [33.0, 102.0, 172.0];
    const WHITE: [f64; 3] = [247.0, 247.0, 247.0];
    const RED: [f64; 3] = [178.0, 24.0, 43.0];
    let Some(ratio) = ratio else { return "#bdbdbd".to_owned() };
    let t = if ratio <= 0.0 { -1.0 } else { (ratio.log2() / 2.0).clamp(-1.0, 1.0) };
    let (end, amount) = if t < 0.0 { (BLUE, -t) } else { (RED, t) };
    let channel = |i: usize| (WHITE[i] + (end[i] - WHITE[i]) * amount).round() as u8;
    format!("#{:02x}{:02x}{:02x}", channel(0), channel(1), channel(2))
}

fn title(svg: &mut String, info: &PlotInfo<'_>, layers: &[LayerLoad], experts: usize) {
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"28\" font-size=\"18\" font-weight=\"bold\">Expert load of {}</text>",
        escape(info.checkpoint)
    );
    let hottest = layers
        .iter()
        .flat_map(|l| {
            let balanced = balanced_load(&l.counts);
            l.counts.iter().enumerate().map(move |(e, &c)| (l.layer, e, c, balanced))
        })
        .max_by_key(|&(_, _, count, _)| count);
    let idle: usize = layers.iter().map(|l| l.counts.iter().filter(|&&c| c == 0).count()).sum();
    let mut line = format!(
        "{} tokens x top-{} over {experts} experts, {} MoE layers; colour: tokens per expert \
         relative to a balanced expert",
        info.tokens,
        info.top_k,
        layers.len()
    );
    if let Some((layer, expert, count, Some(balanced))) = hottest {
        let _ = write!(
            line,
            ". Busiest: layer {layer} expert {expert}, {count} tokens ({:.1}x); {idle} of {} \
             cells got no token",
            f64::from(count) / balanced,
            experts * layers.len()
        );
    }
    let _ =
        writeln!(svg, "<text x=\"{LEFT}\" y=\"50\" font-size=\"12\" fill=\"#444\">{line}</text>");
}

fn axes(svg: &mut String, layers: &[LayerLoad], experts: usize, cell_w: usize, cell_h: usize) {
    let heat_h = layers.len() * cell_h;
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{}\" font-size=\"12\" transform=\"rotate(-90 14 {})\" \
         text-anchor=\"middle\">MoE layer</text>",
        TOP + heat_h / 2,
        TOP + heat_h / 2
    );
    let every = 12usize.div_ceil(cell_h).max(1);
    for (row, load) in layers.iter().enumerate().filter(|(row, _)| row % every == 0) {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" \
             dominant-baseline=\"middle\">{}</text>",
            LEFT - 6,
            TOP + row * cell_h + cell_h / 2,
            load.layer
        );
    }
    let step = [1usize, 2, 4, 8, 16, 32, 64, 128, 256]
        .into_iter()
        .find(|step| step * cell_w >= 40)
        .unwrap_or(512);
    let y = TOP + heat_h;
    for expert in (0..experts).step_by(step) {
        let x = LEFT + expert * cell_w + cell_w / 2;
        let _ = writeln!(
            svg,
            "<line x1=\"{x}\" y1=\"{y}\" x2=\"{x}\" y2=\"{}\" stroke=\"#444\"/>\
             <text x=\"{x}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{expert}</text>",
            y + 4,
            y + 16
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">expert</text>",
        LEFT + experts * cell_w / 2,
        y + 32
    );
}

/// A line where the rank changes between two neighbouring experts.
fn rank_boundaries(svg: &mut String, table: &[i32], cell_w: usize, heat_h: usize) {
    for expert in 1..table.len() {
        if table[expert] != table[expert - 1] {
            let x = LEFT + expert * cell_w;
            let _ = writeln!(
                svg,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#222\" \
                 stroke-width=\"1\" stroke-dasharray=\"3 2\"/>",
                TOP - 4,
                TOP + heat_h
            );
        }
    }
}

/// Each layer's rank imbalance as a number and a bar (1x at the left edge, 3x at the end).
fn rank_panel(svg: &mut String, layers: &[LayerLoad], x: usize, cell_h: usize) {
    const BAR: f64 = 120.0;
    let _ = writeln!(
        svg,
        "<text x=\"{x}\" y=\"{}\" font-size=\"11\" font-weight=\"bold\">rank imbalance</text>\
         <text x=\"{x}\" y=\"{}\" font-size=\"10\" fill=\"#444\">rows of the busiest rank / \
         the mean</text>",
        TOP - 22,
        TOP - 8
    );
    for (row, load) in layers.iter().enumerate() {
        let Some(imbalance) = load.rank_counts.as_deref().and_then(rank_imbalance) else {
            continue;
        };
        let y = TOP + row * cell_h;
        let length = ((imbalance - 1.0) / 2.0).clamp(0.0, 1.0) * BAR;
        let fill = colour(Some(imbalance));
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"{length:.1}\" height=\"{}\" fill=\"{fill}\" \
             stroke=\"#999\" stroke-width=\"0.5\" data-layer=\"{}\" data-imbalance=\"{imbalance:.4}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"{}\" dominant-baseline=\"middle\">{imbalance:.2}x</text>",
            y + 1,
            cell_h.saturating_sub(2).max(1),
            load.layer,
            x + BAR as usize + 6,
            y + cell_h / 2,
            cell_h.clamp(6, 11)
        );
    }
}

/// The colour scale with its landmarks.
fn legend(svg: &mut String, y: usize) {
    const WIDTH: usize = 320;
    let _ = writeln!(svg, "<defs><linearGradient id=\"load\" x1=\"0\" x2=\"1\">");
    for stop in 0..=8 {
        let t = f64::from(stop) / 8.0;
        let ratio = 2f64.powf(t * 4.0 - 2.0);
        let _ = writeln!(svg, "<stop offset=\"{t}\" stop-color=\"{}\"/>", colour(Some(ratio)));
    }
    let _ = writeln!(svg, "</linearGradient></defs>");
    let _ = writeln!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{y}\" width=\"{WIDTH}\" height=\"12\" fill=\"url(#load)\" \
         stroke=\"#999\"/>"
    );
    for (t, label) in
        [(0.0, "0 to 1/4x"), (0.25, "1/2x"), (0.5, "balanced"), (0.75, "2x"), (1.0, "4x+")]
    {
        let x = LEFT + (t * WIDTH as f64) as usize;
        let _ = writeln!(
            svg,
            "<text x=\"{x}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{label}</text>",
            y + 26
        );
    }
}

/// `text` safe inside an XML text node or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<LayerLoad>, Vec<i32>) {
        let table = vec![0, 0, 0, 1, 1, 1];
        let layers = vec![
            LayerLoad { layer: 3, counts: vec![0, 5, 1, 2, 9, 7], rank_counts: Some(vec![6, 18]) },
            LayerLoad { layer: 4, counts: vec![4, 4, 4, 4, 4, 4], rank_counts: Some(vec![12, 12]) },
        ];
        (layers, table)
    }

    #[test]
    fn the_svg_is_well_formed_and_its_numbers_are_the_counts() {
        let (layers, table) = sample();
        let info = PlotInfo {
            checkpoint: "a <b> & \"c\"",
            tokens: 12,
            top_k: 2,
            expert_ranks: Some(&table),
        };
        let svg = render(&info, &layers);
        let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(document.root_element().tag_name().name(), "svg");
        let cells: Vec<_> =
            document.descendants().filter(|n| n.attribute("data-count").is_some()).collect();
        assert_eq!(cells.len(), 12);
        for cell in cells {
            let number = |name| cell.attribute(name).unwrap().parse::<usize>().unwrap();
            let layer = layers.iter().find(|l| l.layer == number("data-layer")).unwrap();
            assert_eq!(layer.counts[number("data-expert")], number("data-count") as i32);
        }
        let imbalances: Vec<f64> = document
            .descendants()
            .filter_map(|n| n.attribute("data-imbalance"))
            .map(|v| v.parse().unwrap())
            .collect();
        // 18 of 24 rows on one of two ranks: 1.5x the mean; the second layer is balanced.
        assert_eq!(imbalances, [1.5, 1.0]);
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
    }

    #[test]
    fn colours_run_from_blue_through_white_to_red() {
        assert_eq!(colour(Some(1.0)), "#f7f7f7");
        assert_eq!(colour(Some(4.0)), "#b2182b");
        assert_eq!(colour(Some(100.0)), "#b2182b");
        assert_eq!(colour(Some(0.25)), "#2166ac");
        assert_eq!(colour(Some(0.0)), "#2166ac");
        assert_eq!(colour(None), "#bdbdbd");
    }
}
