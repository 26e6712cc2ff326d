"""
The synthetic Japanese demo corpus and its evaluation sets, and the demo data build.

    python demo.py              # corpus + eval sets, a tokenizer and shards, all in data/demo
    python demo.py --out DIR --vocab_size 1500 --workers 4

The corpus is synthetic: sentences generated from the templates and entity tables below (mountains,
rivers, prefectures, countries, units of time and measure, English words, ...), the same facts
paraphrased several ways, in documents from a few tokens to several thousand. Its evaluation sets
(Wikipedia-, MIRACL-, JGLUE- and JCoLA-like, in the real sets' file layouts) are synthetic too; their
labels follow from the templates. The generator is deterministic: the same files, byte for byte, on every run.
"""
import argparse
import json
import math
import os
import random
from pathlib import Path

import numpy as np

import ranks
from data import write_atomic, prepare, summary, train_tokenizer
from ranks import Problem

# entity tables: (name, height m, where)
MOUNTAINS = [
    ("エベレスト", 8849, "ネパールと中国の国境"), ("K2", 8611, "パキスタンと中国の国境"),
    ("キリマンジャロ", 5895, "タンザニア"), ("モンブラン", 4808, "フランスとイタリアの国境"),
    ("富士山", 3776, "静岡県と山梨県"), ("北岳", 3193, "山梨県"), ("奥穂高岳", 3190, "長野県と岐阜県"),
    ("槍ヶ岳", 3180, "長野県"), ("御嶽山", 3067, "長野県と岐阜県"), ("乗鞍岳", 3026, "長野県と岐阜県"),
    ("立山", 3015, "富山県"), ("木曽駒ヶ岳", 2956, "長野県"), ("八ヶ岳", 2899, "長野県と山梨県"),
    ("白山", 2702, "石川県と岐阜県"), ("石鎚山", 1982, "愛媛県"), ("大山", 1729, "鳥取県"),
    ("岩木山", 1625, "青森県"), ("阿蘇山", 1592, "熊本県"), ("桜島", 1117, "鹿児島県"),
    ("六甲山", 931, "兵庫県"), ("筑波山", 877, "茨城県"), ("高尾山", 599, "東京都"),
]
# (name, length km, where, flows into)
RIVERS = [
    ("ナイル川", 6695, "アフリカ", "地中海"), ("アマゾン川", 6516, "南アメリカ", "大西洋"),
    ("長江", 6300, "中国", "東シナ海"), ("ミシシッピ川", 3770, "アメリカ", "メキシコ湾"),
    ("信濃川", 367, "長野県と新潟県", "日本海"), ("利根川", 322, "関東地方", "太平洋"),
    ("石狩川", 268, "北海道", "日本海"), ("天塩川", 256, "北海道", "日本海"), ("北上川", 249, "岩手県と宮城県", "太平洋"),
    ("阿武隈川", 239, "福島県と宮城県", "太平洋"), ("木曽川", 229, "長野県と岐阜県と愛知県", "伊勢湾"),
    ("最上川", 229, "山形県", "日本海"), ("天竜川", 213, "長野県と静岡県", "太平洋"), ("四万十川", 196, "高知県", "太平洋"),
    ("吉野川", 194, "四国", "紀伊水道"), ("筑後川", 143, "九州", "有明海"), ("淀川", 75, "京都府と大阪府", "大阪湾"),
]
# (prefecture, seat of government, region)
PREFECTURES = [
    ("北海道", "札幌市", "北海道"), ("青森県", "青森市", "東北"), ("岩手県", "盛岡市", "東北"), ("宮城県", "仙台市", "東北"),
    ("秋田県", "秋田市", "東北"), ("山形県", "山形市", "東北"), ("福島県", "福島市", "東北"), ("茨城県", "水戸市", "関東"),
    ("栃木県", "宇都宮市", "関東"), ("群馬県", "前橋市", "関東"), ("埼玉県", "さいたま市", "関東"), ("千葉県", "千葉市", "関東"),
    ("東京都", "新宿区", "関東"), ("神奈川県", "横浜市", "関東"), ("新潟県", "新潟市", "中部"), ("富山県", "富山市", "中部"),
    ("石川県", "金沢市", "中部"), ("福井県", "福井市", "中部"), ("山梨県", "甲府市", "中部"), ("長野県", "長野市", "中部"),
    ("岐阜県", "岐阜市", "中部"), ("静岡県", "静岡市", "中部"), ("愛知県", "名古屋市", "中部"), ("三重県", "津市", "近畿"),
    ("滋賀県", "大津市", "近畿"), ("京都府", "京都市", "近畿"), ("大阪府", "大阪市", "近畿"), ("兵庫県", "神戸市", "近畿"),
    ("奈良県", "奈良市", "近畿"), ("和歌山県", "和歌山市", "近畿"), ("鳥取県", "鳥取市", "中国"), ("島根県", "松江市", "中国"),
    ("岡山県", "岡山市", "中国"), ("広島県", "広島市", "中国"), ("山口県", "山口市", "中国"), ("徳島県", "徳島市", "四国"),
    ("香川県", "高松市", "四国"), ("愛媛県", "松山市", "四国"), ("高知県", "高知市", "四国"), ("福岡県", "福岡市", "九州"),
    ("佐賀県", "佐賀市", "九州"), ("長崎県", "長崎市", "九州"), ("熊本県", "熊本市", "九州"), ("大分県", "大分市", "九州"),
    ("宮崎県", "宮崎市", "九州"), ("鹿児島県", "鹿児島市", "九州"), ("沖縄県", "那覇市", "九州"),
]
# (country, capital, region of the world)
COUNTRIES = [
    ("日本", "東京", "アジア"), ("中国", "北京", "アジア"), ("韓国", "ソウル", "アジア"), ("タイ", "バンコク", "アジア"),
    ("ベトナム", "ハノイ", "アジア"), ("インド", "ニューデリー", "アジア"), ("トルコ", "アンカラ", "アジア"),
    ("イギリス", "ロンドン", "ヨーロッパ"), ("フランス", "パリ", "ヨーロッパ"), ("ドイツ", "ベルリン", "ヨーロッパ"),
    ("イタリア", "ローマ", "ヨーロッパ"), ("スペイン", "マドリード", "ヨーロッパ"), ("ロシア", "モスクワ", "ヨーロッパ"),
    ("アメリカ", "ワシントン", "北アメリカ"), ("カナダ", "オタワ", "北アメリカ"), ("メキシコ", "メキシコシティ", "北アメリカ"),
    ("ブラジル", "ブラジリア", "南アメリカ"), ("アルゼンチン", "ブエノスアイレス", "南アメリカ"),
    ("エジプト", "カイロ", "アフリカ"), ("ケニア", "ナイロビ", "アフリカ"), ("オーストラリア", "キャンベラ", "オセアニア"),
]
# (whole, count, counter, "およそ" when approximate)
UNITS = [
    ("1年", 12, "ヶ月", ""), ("1年", 365, "日", "およそ"), ("1年", 52, "週間", "およそ"), ("うるう年の1年", 366, "日", ""),
    ("1週間", 7, "日", ""), ("1日", 24, "時間", ""), ("1時間", 60, "分", ""), ("1分", 60, "秒", ""),
    ("1世紀", 100, "年", ""), ("1キロメートル", 1000, "メートル", ""), ("1メートル", 100, "センチメートル", ""),
    ("1センチメートル", 10, "ミリメートル", ""), ("1キログラム", 1000, "グラム", ""), ("1リットル", 1000, "ミリリットル", ""),
    ("1ダース", 12, "個", ""),
]
ENGLISH = [
    ("ありがとう", "thank you"), ("こんにちは", "hello"), ("さようなら", "goodbye"), ("おはよう", "good morning"),
    ("おやすみ", "good night"), ("ごめんなさい", "sorry"), ("犬", "dog"), ("猫", "cat"), ("鳥", "bird"), ("魚", "fish"),
    ("水", "water"), ("本", "book"), ("山", "mountain"), ("川", "river"), ("海", "sea"), ("空", "sky"), ("月", "moon"),
    ("太陽", "sun"), ("花", "flower"), ("木", "tree"), ("友達", "friend"), ("学校", "school"), ("先生", "teacher"),
    ("赤", "red"), ("青", "blue"), ("りんご", "apple"), ("電車", "train"),
]
PLANETS = ["水星", "金星", "地球", "火星", "木星", "土星", "天王星", "海王星"]
ANIMALS = [("犬", "ワンワン"), ("猫", "ニャー"), ("牛", "モー"), ("羊", "メー"), ("豚", "ブーブー"), ("カエル", "ケロケロ"),
           ("カラス", "カーカー"), ("ニワトリ", "コケコッコー")]
MONTH_NAMES = ["睦月", "如月", "弥生", "卯月", "皐月", "水無月", "文月", "葉月", "長月", "神無月", "霜月", "師走"]
LAKES = ["琵琶湖", "霞ヶ浦", "サロマ湖", "猪苗代湖"]
# (what, answer, alternatives for contradictions, question, templates)
SUPERLATIVES = [
    ("世界で最も高い山", "エベレスト", "mountain", "世界で最も高い山は何ですか。",
     ["{x}は、地球上で最も高い山として知られています。", "世界で最も高い山は{x}です。", "地球上で一番高い山は{x}です。"]),
    ("日本で最も高い山", "富士山", "mountain", "日本で最も高い山は何ですか。",
     ["日本で最も高い山は{x}です。", "{x}は日本一高い山として知られています。", "日本の山の中で一番高いのは{x}です。"]),
    ("世界で最も長い川", "ナイル川", "river", "世界で最も長い川は何ですか。",
     ["最も長い川は{x}です。", "世界で最も長い川は{x}です。", "{x}は、地球上で最も長い川として知られています。"]),
    ("日本で最も長い川", "信濃川", "river", "日本で最も長い川は何ですか。",
     ["日本で最も長い川は{x}です。", "{x}は日本一長い川です。", "日本の川の中で一番長いのは{x}です。"]),
    ("太陽系で最も大きい惑星", "木星", "planet", "太陽系で最も大きい惑星は何ですか。",
     ["太陽系で最も大きい惑星は{x}です。", "{x}は太陽系で一番大きな惑星です。", "太陽系の惑星のうち、最も大きいのは{x}です。"]),
    ("日本で最も大きい湖", "琵琶湖", "lake", "日本で最も大きい湖はどこですか。",
     ["日本で最も大きい湖は{x}です。", "{x}は日本一大きな湖として知られています。", "日本の湖の中で一番大きいのは{x}です。"]),
    ("面積が最も大きい都道府県", "北海道", "prefecture", "面積が最も大きい都道府県はどこですか。",
     ["面積が最も大きい都道府県は{x}です。", "{x}は面積が日本一大きな都道府県です。", "都道府県の中で一番広いのは{x}です。"]),
    ("面積が最も小さい都道府県", "香川県", "prefecture", "面積が最も小さい都道府県はどこですか。",
     ["面積が最も小さい都道府県は{x}です。", "{x}は面積が日本一小さな都道府県です。", "都道府県の中で一番狭いのは{x}です。"]),
]
POOLS = {"mountain": [m[0] for m in MOUNTAINS], "river": [r[0] for r in RIVERS], "planet": PLANETS, "lake": LAKES,
         "prefecture": [p[0] for p in PREFECTURES]}

# (kind, attribute) -> (question, paraphrase templates); slot names as in _demo_facts
TEMPLATES = {
    ("mountain", "height"): ("{s}の標高は何メートルですか。", [
        "{s}の標高は{v}メートルです。", "{s}は標高{v}メートルの山です。", "{s}の高さは{v}メートルである。",
        "{s}は高さが{v}メートルあります。", "標高{v}メートルの山として知られるのが{s}です。"]),
    ("mountain", "place"): ("{s}はどこにある山ですか。", [
        "{s}は{v}にある山です。", "{s}は{v}に位置しています。", "{v}には{s}という山があります。", "{s}がある場所は{v}です。"]),
    ("river", "length"): ("{s}の長さは何キロメートルですか。", [
        "{s}の長さは{v}キロメートルです。", "{s}は全長{v}キロメートルの川です。", "{s}の全長はおよそ{v}キロメートルである。",
        "全長{v}キロメートルの川として知られるのが{s}です。"]),
    ("river", "place"): ("{s}はどこを流れていますか。", [
        "{s}は{v}を流れる川です。", "{v}を流れている川に{s}があります。", "{s}の流域は{v}に広がっています。"]),
    ("river", "mouth"): ("{s}はどこに注いでいますか。", [
        "{s}は{v}に注いでいます。", "{s}の河口は{v}にあります。", "{s}の水は最後に{v}へ流れ込みます。"]),
    ("prefecture", "seat"): ("{s}の{o}所在地はどこですか。", [
        "{s}の{o}所在地は{v}です。", "{v}は{s}の{o}所在地です。", "{s}の{o}は{v}に置かれています。", "{s}の{o}があるのは{v}です。"]),
    ("prefecture", "region"): ("{s}は何地方にありますか。", [
        "{s}は{v}地方にあります。", "{s}は{v}地方に属しています。", "{v}地方には{s}が含まれます。"]),
    ("country", "capital"): ("{s}の首都はどこですか。", [
        "{s}の首都は{v}です。", "{v}は{s}の首都です。", "{s}の首都は{v}という都市です。", "{s}では{v}が首都になっています。"]),
    ("country", "region"): ("{s}はどの地域にある国ですか。", [
        "{s}は{v}にある国です。", "{s}は{v}の国の一つです。", "{v}には{s}という国があります。"]),
    ("unit", "count"): ("{s}は何{u}ですか。", [
        "{s}は{a}{v}{u}です。", "{s}には{a}{v}{u}あります。", "{a}{v}{u}で{s}になります。"]),
    ("english", "word"): ("「{s}」は英語で何と言いますか。", [
        "英語で「{s}」は{v}と言います。", "「{s}」は英語で{v}です。", "「{s}」を英語にすると{v}になります。",
        "英語の{v}は、日本語の「{s}」にあたります。"]),
    ("planet", "order"): ("{s}は太陽から何番目の惑星ですか。", [
        "{s}は太陽から{v}番目の惑星です。", "太陽に{v}番目に近い惑星は{s}です。", "太陽系の惑星を太陽に近い順に並べると、{s}は{v}番目です。"]),
    ("animal", "sound"): ("{s}はどのように鳴きますか。", [
        "{s}は「{v}」と鳴きます。", "{s}の鳴き声は「{v}」です。", "「{v}」と鳴く動物は{s}です。"]),
    ("month", "name"): ("{s}の和風月名は何ですか。", [
        "{s}の和風月名は{v}です。", "{v}は{s}の別名です。", "昔の日本では{s}を{v}と呼びました。"]),
}
FILLERS = {
    "mountain": ["{s}は登山者に人気があります。", "{s}の山頂からは美しい景色が見えます。", "毎年多くの人が{s}を訪れます。",
                 "{s}の周辺には豊かな自然が残っています。", "天気の良い日には遠くから{s}が見えます。"],
    "river": ["{s}の流域では古くから農業が盛んです。", "{s}には多くの橋が架かっています。", "夏になると{s}の河原で遊ぶ人が増えます。",
              "{s}の水は飲み水としても使われています。"],
    "prefecture": ["{s}には多くの観光地があります。", "{s}の郷土料理は旅行者にも人気です。", "{s}には歴史のある町並みが残っています。",
                   "{s}では季節ごとにさまざまな祭りが開かれます。"],
    "country": ["{s}には長い歴史があります。", "{s}から日本を訪れる旅行者もいます。", "{s}の料理は日本でも食べることができます。"],
    "unit": ["このような単位は毎日の生活の中でよく使われます。", "単位の関係を覚えておくと計算が楽になります。"],
    "english": ["英語の授業では、まずこのような言葉を学びます。", "外国の人と話すときに便利な表現です。"],
    "planet": ["太陽系には八つの惑星があります。", "夜空を見上げると、惑星が明るく光って見えることがあります。"],
    "animal": ["動物の鳴き声の表し方は言語によって違います。", "子どもたちは動物の鳴き声をまねして遊びます。"],
    "month": ["和風月名は季節の移り変わりを表しています。", "昔の暦では月の呼び方が今とは違いました。"],
    "superlative": ["このことは学校の授業でも習います。", "多くの人がこのことを知っています。"],
}
CONNECTIVES = ["", "", "", "また、", "さらに、", "なお、", "ちなみに、"]
TOPICS = {"mountain": "山", "river": "川", "prefecture": "都道府県", "country": "国と首都", "unit": "単位",
          "english": "英語の言葉", "planet": "惑星", "animal": "動物の鳴き声", "month": "和風月名", "superlative": "日本と世界の一番"}
FILLMASK_PROMPTS = [  # the paper's prompts first, then ones about the demo facts
    "{}は、地球上で最も高い山として知られています。", "1年は{}ヶ月です。", "1年はおよそ{}日です。",
    "英語で「ありがとう」は{}と言います。", "最も長い川は{}です。",
    "日本で最も高い山は{}です。", "日本で最も長い川は{}です。", "長野県の県庁所在地は{}です。", "{}の首都はパリです。",
    "1週間は{}日です。", "地球は太陽から{}番目の惑星です。", "英語で「犬」は{}と言います。", "猫は「{}」と鳴きます。",
    "3月の和風月名は{}です。", "富士山の標高は{}メートルです。",
]


def _demo_facts():
    """Every fact of the demo world: dicts with kind, subject s, attribute, value v and template slots."""
    facts = []

    def add(kind, attr, s, v, **slots):
        question, templates = TEMPLATES[(kind, attr)]
        facts.append({"kind": kind, "attr": attr, "s": s, "v": v, "slots": {"s": s, "v": v, **slots},
                      "question": question, "templates": templates})

    for name, height, where in MOUNTAINS:
        add("mountain", "height", name, height)
        add("mountain", "place", name, where)
    for name, length, where, mouth in RIVERS:
        add("river", "length", name, length)
        add("river", "place", name, where)
        add("river", "mouth", name, mouth)
    for pref, seat, region in PREFECTURES:
        add("prefecture", "seat", pref, seat, o=pref[-1] + "庁")
        add("prefecture", "region", pref, region)
    for country, capital, region in COUNTRIES:
        add("country", "capital", country, capital)
        add("country", "region", country, region)
    for whole, count, counter, approx in UNITS:
        add("unit", "count", whole, count, u=counter, a=approx)
    for ja, en in ENGLISH:
        add("english", "word", ja, en)
    for i, planet in enumerate(PLANETS):
        add("planet", "order", planet, i + 1)
    for animal, sound in ANIMALS:
        add("animal", "sound", animal, sound)
    for i, name in enumerate(MONTH_NAMES):
        add("month", "name", f"{i + 1}月", name)
    for what, answer, pool, question, templates in SUPERLATIVES:
        facts.append({"kind": "superlative", "attr": what, "s": what, "v": answer, "pool": pool,
                      "slots": {"x": answer}, "question": question, "templates": templates})
    for f in facts:  # a unit fact's "attribute" is its counter, so 1年 = 12ヶ月 and 1年 = 365日 differ
        if f["kind"] == "unit":
            f["attr"] = f["slots"]["u"]
    return facts


def _render(fact, k):
    return fact["templates"][k].format(**fact["slots"])


def _say(rng, fact):
    return _render(fact, rng.randrange(len(fact["templates"])))


def _filler(rng, fact):
    subject = fact["s"] if fact["kind"] in ("mountain", "river", "prefecture", "country") else ""
    return rng.choice(FILLERS[fact["kind"]]).format(s=subject)


def _contradicting(rng, fact, facts):
    """A copy of fact with a value that conflicts with the true one (another number, or another entity's)."""
    v = fact["v"]
    if isinstance(v, int):
        while True:
            w = max(1, v + rng.choice([-1, 1]) * rng.randint(max(1, v // 20), max(2, v // 3)))
            if w != v:
                break
    else:
        if fact["kind"] == "superlative":
            pool = [x for x in POOLS[fact["pool"]] if x != v]
        else:
            pool = [f["v"] for f in facts if (f["kind"], f["attr"]) == (fact["kind"], fact["attr"])]
        # "長野県と岐阜県" does not contradict "長野県": values must share no part
        parts = set(str(v).split("と"))
        pool = sorted({x for x in pool if not parts & set(str(x).split("と"))})
        w = rng.choice(pool)
    slots = dict(fact["slots"])
    slots["x" if fact["kind"] == "superlative" else "v"] = w
    return {**fact, "v": w, "slots": slots}


def _paragraph(rng, fact, by_subject, n_extra):
    """Sentences about fact's subject: the fact, the subject's other facts, fillers, linked facts."""
    sents = [_say(rng, fact)]
    others = [f for f in by_subject[fact["s"]] if f is not fact]
    rng.shuffle(others)
    for f in others[:n_extra]:
        sents.append(rng.choice(CONNECTIVES) + _say(rng, f))
    if rng.random() < 0.5:
        sents.append(_filler(rng, fact))
    if fact["kind"] in ("mountain", "river") and fact["attr"] == "place":  # where it is: facts of that place
        for part in str(fact["v"]).split("と"):
            if part in by_subject and rng.random() < 0.5:
                sents.append(rng.choice(CONNECTIVES) + _say(rng, rng.choice(by_subject[part])))
    return "".join(sents)


def _document(rng, facts, by_kind, by_subject, n_chars):
    """(title, text) of about n_chars characters: one topic, paragraphs separated by newlines."""
    kind = rng.choice(sorted(by_kind))
    fact = rng.choice(by_kind[kind])
    if n_chars < 40:  # a snippet or a question with its answer
        if rng.random() < 0.5:
            return fact["s"], _say(rng, fact)
        return fact["s"], f"問：{fact['question'].format(**fact['slots'])}\n答：{_say(rng, fact)}"
    title = fact["s"] if n_chars < 400 else f"{TOPICS[kind]}について"
    paragraphs, size = [], 0
    while size < n_chars:
        if size and rng.random() < 0.3:  # long documents wander between topics
            kind = rng.choice(sorted(by_kind))
        p = _paragraph(rng, rng.choice(by_kind[kind]) if size else fact, by_subject, rng.randint(0, 3))
        paragraphs.append(p)
        size += len(p)
    return title, "\n".join(paragraphs)


def _jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _corrupt(rng, sentence):
    """An ungrammatical variant: a doubled particle, or the predicate moved to the front."""
    ends = [e for e in ("です。", "ます。", "である。") if sentence.endswith(e)]
    depth = np.cumsum([(c == "「") - (c == "」") for c in sentence])  # never inside a quoted word
    slots = [i for i in range(1, len(sentence) - 1)
             if sentence[i] in "はがをにで" and sentence[i - 1] not in "」はがをにで" and depth[i] == 0]
    if ends and (not slots or rng.random() < 0.4):
        e = ends[0]
        return e[:-1] + sentence[:-len(e)] + "。"
    i = rng.choice(slots)
    extra = rng.choice([p for p in "をが" if p != sentence[i]])
    return sentence[:i + 1] + extra + sentence[i + 1:]


WORKERS = min(4, os.cpu_count() or 1)  # processes that tokenize the demo corpus into shards


def write_demo(out_dir="data/demo", n_docs=3000, seed=0):
    """Write the synthetic demo corpus and evaluation sets (layouts as the real data sets; see the module
    docstring) to out_dir; deterministic. Returns {name: path}."""
    out = Path(out_dir)
    rng = random.Random(seed)
    facts = _demo_facts()
    by_kind, by_subject = {}, {}
    for f in facts:
        by_kind.setdefault(f["kind"], []).append(f)
        by_subject.setdefault(f["s"], []).append(f)

    # document lengths from a few characters to ~15k (a few thousand tokens), most of them short
    def length(r):
        u = r.random()
        return int(math.exp(r.uniform(math.log(10), math.log(60)))) if u < 0.35 else \
            int(math.exp(r.uniform(math.log(60), math.log(1500)))) if u < 0.95 else \
            int(math.exp(r.uniform(math.log(1500), math.log(12000))))

    corpus = []
    for _ in range(n_docs):
        corpus.append({"text": _document(rng, facts, by_kind, by_subject, length(rng))[1]})
    _jsonl(out / "corpus.jsonl", corpus)

    # held-out Wikipedia-like articles, 40 per length bin of the pseudo-perplexity analysis (~1.4 characters a token)
    wrng = random.Random(seed + 1)
    wiki = []
    for lo, hi in ((30, 1024), (1024, 2048), (2048, 4096), (4096, 8192)):
        for _ in range(40):
            title, text = _document(wrng, facts, by_kind, by_subject, int(1.4 * wrng.uniform(1.05 * lo, 0.92 * hi)))
            wiki.append({"id": f"wiki-{len(wiki):04d}", "title": title, "text": text})
    _jsonl(out / "wiki.jsonl", wiki)

    # MIRACL-like: per fact, two paraphrases as the two positive passages, other facts of its kind as negatives
    mrng = random.Random(seed + 2)
    miracl = []
    for i, f in enumerate(facts):
        a, b = mrng.sample(range(len(f["templates"])), 2)
        positives = [_render(f, a) + (_filler(mrng, f) if mrng.random() < 0.5 else ""), _render(f, b)]
        negatives = mrng.sample([g for g in by_kind[f["kind"]] if g is not f], 2)
        miracl.append({"query_id": str(i), "query": f["question"].format(**f["slots"]),
                       "positive_passages": [{"docid": f"{i}#{k}", "title": f["s"], "text": t}
                                             for k, t in enumerate(positives)],
                       "negative_passages": [{"docid": f"n{i}#{k}", "title": g["s"], "text": _say(mrng, g)}
                                             for k, g in enumerate(negatives)]})
    _jsonl(out / "miracl.jsonl", miracl)

    # JSTS-like similarity, labels by relation: 5 paraphrase, 4 paraphrase plus another sentence, 3 same subject,
    # 2 same attribute of another subject, 1 same kind, 0 unrelated
    srng = random.Random(seed + 3)
    jsts = []
    for n in range(3000):
        f = srng.choice(facts)
        label = n % 6
        same_kind = [g for g in by_kind[f["kind"]] if g["s"] != f["s"]]
        if label == 5 or label == 4:
            a, b = srng.sample(range(len(f["templates"])), 2)
            g_text = _render(f, b) + (_filler(srng, f) if label == 4 else "")
            s1, s2 = _render(f, a), g_text
        else:
            if label == 3:
                pool = [g for g in by_subject[f["s"]] if g is not f]
            elif label == 2:
                pool = [g for g in same_kind if g["attr"] == f["attr"]]
            elif label == 1:
                pool = [g for g in same_kind if g["attr"] != f["attr"]]
            else:
                pool = [g for g in facts if g["kind"] != f["kind"]]
            if not pool:
                continue
            s1, s2 = _say(srng, f), _say(srng, srng.choice(pool))
        jsts.append({"sentence_pair_id": str(len(jsts)), "sentence1": s1, "sentence2": s2, "label": float(label)})

    # JNLI-like: entailment = paraphrase, contradiction = conflicting value, neutral = another fact
    nrng = random.Random(seed + 4)
    jnli = []
    for n in range(3000):
        f = nrng.choice(facts)
        a, b = nrng.sample(range(len(f["templates"])), 2)
        label = ("entailment", "contradiction", "neutral")[n % 3]
        if label == "entailment":
            hyp = _render(f, b)
        elif label == "contradiction":
            hyp = _render(_contradicting(nrng, f, facts), b)
        else:
            pool = [g for g in by_subject[f["s"]] if g is not f] or [g for g in by_kind[f["kind"]] if g["s"] != f["s"]]
            hyp = _say(nrng, nrng.choice(pool))
        jnli.append({"sentence_pair_id": str(len(jnli)), "sentence1": _render(f, a), "sentence2": hyp, "label": label})

    # JCoLA-like acceptability: template sentences (1) and corrupted ones (0)
    crng = random.Random(seed + 5)
    jcola = []
    for n in range(3000):
        s = _say(crng, crng.choice(facts))
        label = n % 2
        jcola.append({"uid": len(jcola), "source": "synthetic", "label": label,
                      "sentence": s if label else _corrupt(crng, s)})

    paths = {"corpus": out / "corpus.jsonl", "wiki": out / "wiki.jsonl", "miracl": out / "miracl.jsonl",
             "jglue": out / "JGLUE" / "datasets", "jcola": out / "JCoLA" / "data" / "jcola-v1.0",
             "fillmask": out / "fillmask.txt"}
    for name, rows in (("jsts", jsts), ("jnli", jnli)):
        cut = len(rows) * 4 // 5
        _jsonl(paths["jglue"] / f"{name}-v1.3" / "train-v1.3.json", rows[:cut])
        _jsonl(paths["jglue"] / f"{name}-v1.3" / "valid-v1.3.json", rows[cut:])
    cut = len(jcola) * 4 // 5
    _jsonl(paths["jcola"] / "in_domain_train-v1.0.json", jcola[:cut])
    _jsonl(paths["jcola"] / "in_domain_valid-v1.0.json", jcola[cut:])
    write_atomic(paths["fillmask"], "".join(p + "\n" for p in FILLMASK_PROMPTS))
    return paths


def build(out_dir="data/demo", vocab_size=1500, workers=WORKERS):
    """write_demo, then a tokenizer trained on the corpus and its shards (5% held out) in out_dir/shards.
    Returns prepare's manifest."""
    paths = write_demo(out_dir)
    print(f"wrote the synthetic demo corpus and eval sets to {out_dir}")
    tok = train_tokenizer(paths["corpus"], vocab_size, Path(out_dir) / "tokenizer.model")
    print(f"trained {tok} (vocab {vocab_size})")
    return prepare(paths["corpus"], tok, Path(out_dir) / "shards", workers=workers, val_fraction=0.05)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--vocab_size", type=int, default=1500, help="the demo text allows at most ~1700")
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)
    try:
        print(summary(build(args.out, args.vocab_size, args.workers)))
    except Problem as e:
        ranks.exit_with(str(e))


if __name__ == "__main__":
    main()
